//! [`Connection`]: one tether connection over TCP (or any [`Transport`]), driven by its own
//! task.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tether_proto::codec::{Hello, Welcome};
use tether_proto::{
    CloseCode, Conn, ConnConfig, ConnEvent, Disconnect, DisconnectReason, LivenessConfig, Policy,
};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::credential::{CredentialError, Credentials};
use crate::driver::{self, Decision, Limits, Shared, Sink, StatsSnapshot};
use crate::sockopt;
use crate::tls::TlsClient;
use crate::transport::Transport;

/// How a connection ended: the reason and how long the peer had been silent.
pub type Disconnected = Disconnect;

/// The liveness settings a side applies, derived from a [`Policy`].
///
/// The server dictates heartbeat and dead-after in the WELCOME; the client adopts them. The
/// server also marks a silent client `Suspect` after [`Policy::suspect_after`], enforces
/// the heartbeat interval it dictated, and answers the client's heartbeats (its own timer is
/// a fallback at `h + h/8`, PROTOCOL.md §7 rule 1): one wake-up per idle client per interval.
pub fn liveness_config(policy: &Policy, server: bool) -> LivenessConfig {
    let h = policy.heartbeat_interval;
    let suspect = policy.suspect_after().min(policy.dead_after.mul_f64(0.9));
    LivenessConfig {
        heartbeat_interval: h,
        dead_after: policy.dead_after,
        suspect_after: server.then_some(suspect),
        idle_timeout: policy.idle_timeout,
        ping_interval: policy.ping_interval,
        enforce_peer_heartbeat: server.then_some(h),
        answer_peer_heartbeat: server,
    }
}

/// Options for [`Connection::connect_with`].
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Who this client is (1–255 bytes of UTF-8).
    pub client_id: String,
    /// The local policy: socket options, and the heartbeat interval requested in the HELLO
    /// (the server's WELCOME decides). Default: `Policy::default()`.
    pub policy: Policy,
    /// Longest frame accepted. Default: 1 MiB.
    pub max_frame_len: u32,
    /// TCP connect plus handshake must finish within this. Default: 10 s.
    pub handshake_timeout: Duration,
    /// The credential presented in the HELLO and refreshed in band at 90 % of its ttl.
    /// Default: none.
    pub credential: Option<Credentials>,
    /// Speak TLS to the server (its certificate verified against this client's roots, for
    /// the address's IP unless the `TlsClient` names the server). Default: none (plain TCP).
    pub tls: Option<TlsClient>,
}

impl ConnectOptions {
    /// Options with defaults for `client_id`.
    pub fn new(client_id: impl Into<String>) -> Self {
        ConnectOptions {
            client_id: client_id.into(),
            policy: Policy::default(),
            max_frame_len: tether_proto::codec::DEFAULT_MAX_FRAME_LEN,
            handshake_timeout: Duration::from_secs(10),
            credential: None,
            tls: None,
        }
    }

    /// Sets the credential source (see [`Credentials`]). Default: none.
    pub fn credential(mut self, c: Credentials) -> Self {
        self.credential = Some(c);
        self
    }

    /// Connects with TLS. Default: plain TCP.
    pub fn tls(mut self, tls: TlsClient) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sets the policy. Default: `Policy::default()`.
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets the maximum frame length. Default: 1 MiB.
    pub fn max_frame_len(mut self, len: u32) -> Self {
        self.max_frame_len = len;
        self
    }

    /// Sets the handshake timeout. Default: 10 s.
    pub fn handshake_timeout(mut self, t: Duration) -> Self {
        self.handshake_timeout = t;
        self
    }
}

/// Why a connection could not be set up.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// TCP connect failed.
    #[error("cannot connect to {addr}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Setting socket options failed.
    #[error("cannot set socket options")]
    SocketOptions(#[source] std::io::Error),
    /// The client id is not acceptable (see [`tether_proto::client_id`]).
    #[error("invalid client id {id:?}")]
    InvalidClientId {
        /// The id.
        id: String,
        /// What is wrong with it.
        #[source]
        source: tether_proto::ClientIdError,
    },
    /// The TLS handshake failed (certificate not trusted, wrong name, no client certificate).
    #[error("tls handshake with {addr} failed")]
    Tls {
        /// Where.
        addr: SocketAddr,
        /// What rustls said.
        #[source]
        source: std::io::Error,
    },
    /// The credential could not be had.
    #[error("no credential")]
    Credential(#[source] CredentialError),
    /// The server refused the connection.
    #[error("refused by server: {code}: {text}")]
    Refused {
        /// Refusal code.
        code: CloseCode,
        /// Server's text.
        text: String,
    },
    /// The handshake did not complete within the deadline.
    #[error("handshake not complete after {0:?}")]
    Timeout(Duration),
    /// The connection ended during the handshake.
    #[error("connection ended during the handshake: {0}")]
    Handshake(DisconnectReason),
}

/// What a standalone connection's handshake produced: the welcome and (server side) the hello.
type HandshakeResult = Result<(Welcome, Option<Hello>), Disconnect>;

/// Standalone connection sink: messages to the inbox, the handshake result to a oneshot.
struct ConnSink {
    ready: Option<oneshot::Sender<HandshakeResult>>,
    hello: Option<Hello>,
    accept: Option<LivenessConfig>,
    /// Messages of the current wake-up, pushed to the inbox together.
    batch: Vec<Bytes>,
    /// How many messages the previous batch held: room reserved at the first message of
    /// the next (one allocation per batch, not a dozen as the batch doubles its way up).
    batch_hint: usize,
    /// Client: where a refreshed credential comes from.
    credentials: Option<Credentials>,
}

impl Sink for ConnSink {
    fn hello(
        &mut self,
        _shared: &Arc<Shared>,
        _now: std::time::Instant,
        hello: &Hello,
    ) -> Decision {
        self.hello = Some(hello.clone());
        match self.accept.take() {
            Some(cfg) => Decision::Accept(Arc::new(cfg), None, None),
            None => Decision::Refuse(CloseCode::REFUSED, "not accepting".into()),
        }
    }

    fn event(&mut self, shared: &Arc<Shared>, ev: ConnEvent) {
        match ev {
            ConnEvent::RefreshCredential { .. } => {
                if let Some(c) = &self.credentials {
                    c.refresh_into(shared);
                }
            }
            ConnEvent::Established(w) => {
                if let Some(tx) = self.ready.take() {
                    let _ = tx.send(Ok((w, self.hello.take())));
                }
            }
            // Batched: the inbox lock is taken once per wake-up, not once per message.
            ConnEvent::Message { payload: m, .. } => {
                if self.batch.capacity() == 0 {
                    // At most 64 KiB of room on a guess.
                    self.batch.reserve(self.batch_hint.min(2048));
                }
                self.batch.push(m)
            }
            ConnEvent::Closed(d) => {
                if let Some(tx) = self.ready.take() {
                    let _ = tx.send(Err(d));
                }
            }
            _ => {}
        }
    }

    fn flush(&mut self, shared: &Shared) {
        if !self.batch.is_empty() {
            self.batch_hint = self.batch.len();
            shared.push_inbox(&mut self.batch);
            // Nothing kept between batches (an idle connection holds no buffer).
            self.batch = Vec::new();
        }
    }
}

/// One tether connection. Cheap to share for sending (`send` takes `&self`); receiving takes
/// `&mut self`. Dropping the `Connection` closes it in order.
///
/// Without a [`Server`](crate::Server), both ends can be plain connections: the accepting
/// side dictates the heartbeat interval and dead-after from its policy.
///
/// ```
/// use std::time::Duration;
/// use tether::{Bytes, CloseCode, Connection, DisconnectReason, Policy};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let policy = Policy::builder(Duration::from_secs(5)).build()?;
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let addr = listener.local_addr()?;
/// let p = policy.clone();
/// let server = tokio::spawn(async move {
///     let (stream, _) = listener.accept().await?;
///     let (mut conn, hello) = Connection::accept(stream, &p).await?;
///     let m = conn.recv().await?;
///     conn.send(m).await?; // echo
///     let end = conn.recv().await.unwrap_err();
///     Ok::<_, Box<dyn std::error::Error + Send + Sync>>((hello.client_id, end.reason))
/// });
///
/// let mut c = Connection::connect(addr, "desk-7", &policy).await?;
/// assert_eq!(c.welcome().heartbeat, policy.heartbeat_interval);
/// c.send(Bytes::from_static(b"ping")).await?;
/// assert_eq!(&c.recv().await?[..], b"ping");
/// c.close(CloseCode::NORMAL, "done");
///
/// let (id, reason) = server.await?.map_err(|e| e.to_string())?;
/// assert_eq!(id, "desk-7");
/// assert!(matches!(reason, DisconnectReason::PeerClose { code: CloseCode::NORMAL, .. }));
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Connection {
    shared: Arc<Shared>,
    welcome: Welcome,
    peer: Option<SocketAddr>,
    /// Received messages taken from the inbox in one go, handed out by `recv` without the
    /// lock (see [`Shared::poll_recv_batch`]).
    batch: VecDeque<Bytes>,
    /// What `batch` weighed when it was taken (still counted against the inbox bound).
    batch_bytes: usize,
}

impl Connection {
    /// Connects to a tether server as `client_id` with `policy`'s socket options.
    pub async fn connect(
        addr: SocketAddr,
        client_id: &str,
        policy: &Policy,
    ) -> Result<Connection, ConnectError> {
        Connection::connect_with(addr, &ConnectOptions::new(client_id).policy(policy.clone())).await
    }

    /// Connects with full options.
    pub async fn connect_with(
        addr: SocketAddr,
        opts: &ConnectOptions,
    ) -> Result<Connection, ConnectError> {
        let t = opts.handshake_timeout;
        let work = async {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|source| ConnectError::Connect { addr, source })?;
            sockopt::apply(&stream, &opts.policy).map_err(ConnectError::SocketOptions)?;
            let mut c = match &opts.tls {
                None => Connection::client_over(stream, opts).await?,
                Some(tls) => {
                    let stream = tls
                        .connect(&addr.ip().to_string(), stream)
                        .await
                        .map_err(|source| ConnectError::Tls { addr, source })?;
                    Connection::client_over(stream, opts).await?
                }
            };
            c.peer = Some(addr);
            Ok(c)
        };
        tokio::time::timeout(t, work)
            .await
            .map_err(|_| ConnectError::Timeout(t))?
    }

    /// Runs the client side over any transport (the caller already connected it).
    pub async fn client_over<T: Transport>(
        io: T,
        opts: &ConnectOptions,
    ) -> Result<Connection, ConnectError> {
        tether_proto::check_client_id(&opts.client_id).map_err(|source| {
            ConnectError::InvalidClientId {
                id: opts.client_id.clone(),
                source,
            }
        })?;
        let credential = match &opts.credential {
            Some(c) => Some(c.fetch().await.map_err(ConnectError::Credential)?),
            None => None,
        };
        let now = tokio::time::Instant::now().into_std();
        let hello = Hello {
            client_id: opts.client_id.clone(),
            requested_heartbeat: opts.policy.heartbeat_interval,
            want_session: false,
            resume: None,
            credential,
        };
        let cfg = ConnConfig {
            max_frame_len: opts.max_frame_len,
            handshake_timeout: opts.handshake_timeout,
            ..ConnConfig::default()
        };
        let conn = Conn::client(now, cfg, &hello, liveness_config(&opts.policy, false), None);
        let (tx, rx) = oneshot::channel();
        let shared = Shared::new(Limits::default());
        let sink = ConnSink {
            ready: Some(tx),
            hello: None,
            accept: None,
            batch: Vec::new(),
            batch_hint: 0,
            credentials: opts.credential.clone(),
        };
        tokio::spawn(driver::drive(io, conn, shared.clone(), sink));
        match rx.await {
            Ok(Ok((welcome, _))) => Ok(Connection {
                shared,
                welcome,
                peer: None,
                batch: VecDeque::new(),
                batch_bytes: 0,
            }),
            Ok(Err(Disconnect {
                reason: DisconnectReason::Refused { code, text },
                ..
            })) => Err(ConnectError::Refused { code, text }),
            Ok(Err(d)) => Err(ConnectError::Handshake(d.reason)),
            Err(_) => Err(ConnectError::Handshake(DisconnectReason::LocalClose)),
        }
    }

    /// Server side for one accepted TCP stream, without a [`Server`](crate::Server): applies
    /// `policy`'s socket options, waits for the HELLO, accepts it and dictates `policy`'s
    /// heartbeat and dead-after. Returns the connection and the client's hello.
    pub async fn accept(
        stream: TcpStream,
        policy: &Policy,
    ) -> Result<(Connection, Hello), ConnectError> {
        sockopt::apply(&stream, policy).map_err(ConnectError::SocketOptions)?;
        let peer = stream.peer_addr().ok();
        let (mut c, h) = Connection::accept_over(stream, policy, &ConnConfig::default()).await?;
        c.peer = peer;
        Ok((c, h))
    }

    /// Server side over any transport.
    pub async fn accept_over<T: Transport>(
        io: T,
        policy: &Policy,
        cfg: &ConnConfig,
    ) -> Result<(Connection, Hello), ConnectError> {
        let now = tokio::time::Instant::now().into_std();
        let conn = Conn::server(now, cfg.clone());
        let (tx, rx) = oneshot::channel();
        let shared = Shared::new(Limits::default());
        let sink = ConnSink {
            ready: Some(tx),
            hello: None,
            accept: Some(liveness_config(policy, true)),
            batch: Vec::new(),
            batch_hint: 0,
            credentials: None,
        };
        tokio::spawn(driver::drive(io, conn, shared.clone(), sink));
        match rx.await {
            Ok(Ok((welcome, Some(hello)))) => Ok((
                Connection {
                    shared,
                    welcome,
                    peer: None,
                    batch: VecDeque::new(),
                    batch_bytes: 0,
                },
                hello,
            )),
            Ok(Ok((_, None))) => Err(ConnectError::Handshake(DisconnectReason::ProtocolError(
                "no hello".into(),
            ))),
            Ok(Err(d)) => Err(ConnectError::Handshake(d.reason)),
            Err(_) => Err(ConnectError::Handshake(DisconnectReason::LocalClose)),
        }
    }

    /// The handshake's parameters (heartbeat interval and dead-after in force).
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The peer's address, when known.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// Sends a message. Waits while the outbox is full (back-pressure); fails with how the
    /// connection ended once it has.
    pub async fn send(&self, msg: Bytes) -> Result<(), Disconnected> {
        self.shared.send(msg).await
    }

    /// Receives the next message; once the connection has ended and every received message
    /// was taken, returns how it ended (again on every later call).
    pub async fn recv(&mut self) -> Result<Bytes, Disconnected> {
        if let Some(m) = self.batch.pop_front() {
            return Ok(m);
        }
        poll_fn(|cx| {
            self.shared
                .poll_recv_batch(cx, &mut self.batch, &mut self.batch_bytes)
        })
        .await
    }

    /// Closes in order with `code` and `text` (CLOSE frame, then FIN).
    pub fn close(&self, code: CloseCode, text: &str) {
        self.shared.close(code, text);
    }

    /// How the connection ended, if it has.
    pub fn disconnected(&self) -> Option<Disconnected> {
        self.shared.done()
    }

    /// Waits until the connection has ended (without taking messages).
    pub async fn closed(&self) -> Disconnected {
        self.shared.closed().await
    }

    /// Counters, readable at any time.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// A cloneable handle that can send and close, for use from other tasks.
    pub fn sender(&self) -> Sender {
        Sender {
            shared: self.shared.clone(),
        }
    }
}

/// A cloneable sending half of a [`Connection`] (or of a server-side connection).
#[derive(Debug, Clone)]
pub struct Sender {
    pub(crate) shared: Arc<Shared>,
}

impl Sender {
    /// Sends a message, waiting while the outbox is full.
    pub async fn send(&self, msg: Bytes) -> Result<(), Disconnected> {
        self.shared.send(msg).await
    }

    /// Queues a message without waiting; `false` when the outbox is full or the connection ended.
    pub fn try_send(&self, msg: Bytes) -> bool {
        self.shared.try_send(msg)
    }

    /// Closes in order with `code` and `text`.
    pub fn close(&self, code: CloseCode, text: &str) {
        self.shared.close(code, text);
    }

    /// How the connection ended, if it has.
    pub fn disconnected(&self) -> Option<Disconnected> {
        self.shared.done()
    }

    /// Counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shared.close(CloseCode::NORMAL, "");
    }
}
