//! [`Server`]: accepts tether clients, knows who is online and why each one left.
//!
//! ```text
//!  accept loop ──▶ per-connection task (driver::drive + ServerSink)
//!                       │ Hello → validate, capacity, registry.connected (old conn → Replaced)
//!                       │ Message → events channel (no lock)
//!                       │ Suspect/Recovered/Closed → registry (lock taken on state changes only)
//!                       ▼
//!  presence registry (one Mutex, one expiry task with one sleep) ──▶ PresenceChange subscribers
//! ```
//!
//! Sending to a client looks it up in a sharded map (no global lock per message).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tether_proto::codec::{Hello, SessionGrant, TOKEN_LEN};
use tether_proto::presence::{
    PresenceChange, PresenceCounts, PresenceState, Registry, RegistryConfig,
};
use tether_proto::session::{Session, SessionConfig};
use tether_proto::{CloseCode, Conn, ConnConfig, ConnEvent, Disconnect, DisconnectReason, Policy};
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc, Notify};

use crate::connection::liveness_config;
use crate::driver::{self, Backlog, Decision, Limits, Shared, Sink, StatsSnapshot};
use crate::sockopt;

const SHARDS: usize = 32;

/// Server settings. Build with [`ServerConfig::new`] and the setters.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where to listen. Default: `127.0.0.1:7300`.
    pub listen: SocketAddr,
    /// Liveness policy applied to every client. Default: `Policy::default()`.
    pub policy: Policy,
    /// Connections beyond this are refused with `server-full`. Default: 100,000.
    pub max_connections: usize,
    /// A client must complete its hello within this. Default: 10 s.
    pub handshake_timeout: Duration,
    /// Longest frame accepted. Default: 1 MiB.
    pub max_frame_len: u32,
    /// Presence registry settings (offline retention and bound).
    pub registry: RegistryConfig,
    /// Bytes queued per client before `send` waits. Default: 1 MiB.
    pub outbox_bytes: usize,
    /// How long a client's session is held after its connection ends, so it can resume
    /// without losing or duplicating a message. `None` disables sessions. Default: 30 s.
    pub session_linger: Option<Duration>,
    /// Replay bounds and ACK timing of sessions. Default: `SessionConfig::default()`.
    pub session: SessionConfig,
    /// Received messages waiting in [`Server::next_event`] before every connection stops
    /// reading until the application catches up (TCP back-pressure to the clients; no false
    /// deaths meanwhile). Default: 65,536.
    pub max_queued_messages: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7300)),
            policy: Policy::default(),
            max_connections: 100_000,
            handshake_timeout: Duration::from_secs(10),
            max_frame_len: tether_proto::codec::DEFAULT_MAX_FRAME_LEN,
            registry: RegistryConfig::default(),
            outbox_bytes: 1 << 20,
            session_linger: Some(Duration::from_secs(30)),
            session: SessionConfig::default(),
            max_queued_messages: 65_536,
        }
    }
}

impl ServerConfig {
    /// Defaults, listening on `listen`.
    pub fn new(listen: SocketAddr) -> Self {
        ServerConfig {
            listen,
            ..Default::default()
        }
    }
    /// Sets the policy. Default: `Policy::default()`.
    pub fn policy(mut self, p: Policy) -> Self {
        self.policy = p;
        self
    }
    /// Sets the connection limit. Default: 100,000.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }
    /// Sets the handshake deadline. Default: 10 s.
    pub fn handshake_timeout(mut self, t: Duration) -> Self {
        self.handshake_timeout = t;
        self
    }
    /// Sets the maximum frame length. Default: 1 MiB.
    pub fn max_frame_len(mut self, n: u32) -> Self {
        self.max_frame_len = n;
        self
    }
    /// Sets how many received messages may wait for the application before reading pauses.
    /// Default: 65,536.
    pub fn max_queued_messages(mut self, n: usize) -> Self {
        self.max_queued_messages = n;
        self
    }
    /// Sets how long sessions are held after a disconnect (`None` disables sessions).
    /// Default: 30 s.
    pub fn session_linger(mut self, linger: Option<Duration>) -> Self {
        self.session_linger = linger;
        self
    }
    /// Sets the session replay bounds. Default: `SessionConfig::default()`.
    pub fn session_config(mut self, cfg: SessionConfig) -> Self {
        self.session = cfg;
        self
    }
}

/// What happens on the server, in order per client.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerEvent {
    /// A client completed its handshake.
    Connected {
        /// Client id.
        client_id: String,
        /// Its address.
        remote: SocketAddr,
        /// Connection id (unique per server).
        conn_id: u64,
        /// The connection it replaced, if any.
        replaced: Option<u64>,
    },
    /// A client sent a message.
    Message {
        /// Client id.
        client_id: String,
        /// The message.
        msg: Bytes,
    },
    /// A client's connection ended.
    Disconnected {
        /// Client id.
        client_id: String,
        /// Connection id.
        conn_id: u64,
        /// Why and how long it had been silent.
        disconnect: Disconnect,
    },
    /// A client resumed its session on a new connection; `replayed` of the server's
    /// messages are being sent again.
    Resumed {
        /// Client id.
        client_id: String,
        /// The new connection id.
        conn_id: u64,
        /// Messages the server replays.
        replayed: u64,
    },
    /// A client's session ended without being resumed (linger expired, or the client started
    /// a new session): these server messages may not have been delivered.
    SessionLost {
        /// Client id.
        client_id: String,
        /// Sequence numbers sent but not acknowledged (may or may not have arrived).
        unacked: Option<RangeInclusive<u64>>,
        /// Messages queued for the client and never sent (certainly not delivered).
        unsent: Vec<Bytes>,
    },
    /// A connection was refused (hello rejected, server full, handshake timeout, garbage).
    Refused {
        /// Its address.
        remote: SocketAddr,
        /// Why.
        reason: DisconnectReason,
    },
}

/// A client as the status page and the query API see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// Client id.
    pub id: String,
    /// Presence state (with reason and silence for `Offline`).
    pub state: PresenceState,
    /// Remote address of the current (or last) connection.
    pub remote: SocketAddr,
    /// When the current (or last) connection was established.
    pub connected_since: Instant,
    /// When the state last changed.
    pub changed_at: Instant,
    /// Counters of the live connection (`None` when not connected).
    pub stats: Option<StatsSnapshot>,
    /// Connections registered for this id.
    pub connects: u64,
    /// Connections of this id that ended.
    pub disconnects: u64,
    /// The current (or last) connection id.
    pub conn_id: u64,
}

/// Server-wide counters for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerMetrics {
    /// Open connections (handshaking included).
    pub connections: usize,
    /// Presence states.
    pub presence: PresenceCounts,
    /// Disconnects by [`DisconnectReason::label`], in `LABELS` order.
    pub disconnects: Vec<(&'static str, u64)>,
    /// Heartbeats sent, all connections ever.
    pub heartbeats_sent: u64,
    /// Heartbeats received, all connections ever.
    pub heartbeats_received: u64,
    /// Messages received, all connections ever.
    pub messages_received: u64,
    /// Messages sent, all connections ever.
    pub messages_sent: u64,
    /// Connections accepted since start.
    pub accepted: u64,
    /// Connections refused since start.
    pub refused: u64,
}

/// Why a server-side send failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SendError {
    /// No open connection for this client id.
    #[error("client {0:?} is not connected")]
    NotConnected(String),
    /// The client is resuming and its backlog is full.
    #[error("client {0:?} is resuming and its backlog is full")]
    Backlogged(String),
    /// The connection ended while sending.
    #[error("connection to {client_id:?} ended: {reason}")]
    Disconnected {
        /// Client id.
        client_id: String,
        /// Why.
        reason: DisconnectReason,
    },
}

#[derive(Debug)]
struct Live {
    conn_id: u64,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Totals {
    heartbeats_sent: AtomicU64,
    heartbeats_received: AtomicU64,
    messages_received: AtomicU64,
    messages_sent: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    disconnects: [AtomicU64; DisconnectReason::LABELS.len()],
}

struct Inner {
    cfg: ServerConfig,
    shards: Vec<Mutex<HashMap<String, Live>>>,
    registry: Mutex<Registry>,
    signals: Arc<Signals>,
    presence_tx: broadcast::Sender<PresenceChange>,
    events: mpsc::UnboundedSender<ServerEvent>,
    open: AtomicUsize,
    next_conn_id: AtomicU64,
    totals: Totals,
    sessions: Mutex<HashMap<String, SessionSlot>>,
    next_session_id: AtomicU64,
    backlog: Arc<Backlog>,
}

/// A client's session as the server keeps it.
struct SessionSlot {
    id: u64,
    token: [u8; TOKEN_LEN],
    /// The connection the session is attached to (or was, while held).
    conn_id: u64,
    /// The session while no connection runs it (Resuming).
    held: Option<Session>,
    /// Messages for the client queued while it was resuming (never sent yet).
    pending: VecDeque<Bytes>,
    pending_bytes: usize,
}

fn random_token() -> [u8; TOKEN_LEN] {
    let mut t = [0u8; TOKEN_LEN];
    // The OS random source is required for unguessable tokens; without it, refuse to run
    // sessions rather than hand out predictable ones.
    getrandom::getrandom(&mut t).expect("the OS random source is unavailable");
    t
}

/// Wake-ups for the registry's expiry task, kept outside `Inner` so the task can wait on them
/// while holding only a weak reference to the server.
#[derive(Default)]
struct Signals {
    registry_changed: Notify,
    shutdown: Notify,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.signals.shutdown.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl Inner {
    fn shard(&self, id: &str) -> &Mutex<HashMap<String, Live>> {
        // FNV-1a: cheap, and client ids are not attacker-chosen keys for a shared table
        // (each shard is a HashMap with its own random hasher).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in id.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        &self.shards[(h % SHARDS as u64) as usize]
    }

    /// Runs `f` on the registry, then publishes its queued changes.
    fn with_registry<R>(&self, f: impl FnOnce(&mut Registry) -> R) -> R {
        let mut reg = lock(&self.registry);
        let r = f(&mut reg);
        let changes: Vec<PresenceChange> = std::iter::from_fn(|| reg.poll_change()).collect();
        drop(reg);
        self.publish(changes);
        self.signals.registry_changed.notify_one();
        r
    }

    /// Publishes presence changes; a hold that ran out (Resuming → Offline) ends its session.
    fn publish(&self, changes: Vec<PresenceChange>) {
        for ch in changes {
            if matches!(ch.from, Some(PresenceState::Resuming { .. }))
                && matches!(ch.to, PresenceState::Offline { .. })
            {
                self.expire_session(&ch.id);
            }
            let _ = self.presence_tx.send(ch);
        }
    }

    /// Drops a held session whose linger ended and tells the application what was lost.
    fn expire_session(&self, id: &str) {
        let slot = {
            let mut sessions = lock(&self.sessions);
            match sessions.get(id) {
                Some(slot) if slot.held.is_some() => sessions.remove(id),
                _ => None,
            }
        };
        if let Some(mut slot) = slot {
            let unacked = slot.held.take().and_then(|s| s.unacked_range());
            let _ = self.events.send(ServerEvent::SessionLost {
                client_id: id.to_owned(),
                unacked,
                unsent: slot.pending.into_iter().collect(),
            });
        }
    }
}

/// A running server. Take events with [`next_event`](Server::next_event); use
/// [`handle`](Server::handle) to send, query and shut down from anywhere.
pub struct Server {
    handle: ServerHandle,
    events: mpsc::UnboundedReceiver<ServerEvent>,
}

/// A cloneable handle to a running server.
#[derive(Clone)]
pub struct ServerHandle {
    inner: Arc<Inner>,
    local_addr: SocketAddr,
    tasks: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

impl Server {
    /// Binds and starts accepting.
    pub async fn bind(cfg: ServerConfig) -> std::io::Result<Server> {
        let listener = TcpListener::bind(cfg.listen).await?;
        Ok(Server::from_listener(listener, cfg))
    }

    /// Starts accepting on an already bound listener (`cfg.listen` is ignored).
    pub fn from_listener(listener: TcpListener, cfg: ServerConfig) -> Server {
        let local_addr = listener.local_addr().unwrap_or(cfg.listen);
        let (tx, rx) = mpsc::unbounded_channel();
        let (presence_tx, _) = broadcast::channel(4096);
        let cfg_max_queued = cfg.max_queued_messages;
        let inner = Arc::new(Inner {
            registry: Mutex::new(Registry::new(cfg.registry)),
            cfg,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            signals: Arc::new(Signals::default()),
            presence_tx,
            events: tx,
            open: AtomicUsize::new(0),
            next_conn_id: AtomicU64::new(1),
            totals: Totals::default(),
            sessions: Mutex::new(HashMap::new()),
            next_session_id: AtomicU64::new(1),
            backlog: Arc::new(Backlog::new(cfg_max_queued)),
        });
        let accept = tokio::spawn(accept_loop(listener, inner.clone()));
        tokio::spawn(expiry_loop(Arc::downgrade(&inner), inner.signals.clone()));
        Server {
            handle: ServerHandle {
                inner,
                local_addr,
                tasks: Arc::new(Mutex::new(Some(accept))),
            },
            events: rx,
        }
    }

    /// The next event; `None` after shutdown.
    ///
    /// Drain it: received messages wait here, and above `max_queued_messages` every
    /// connection stops reading until the application catches up.
    pub async fn next_event(&mut self) -> Option<ServerEvent> {
        let ev = self.events.recv().await;
        if let Some(ServerEvent::Message { .. }) = &ev {
            self.handle.inner.backlog.pop();
        }
        ev
    }

    /// Received messages waiting in [`next_event`](Self::next_event).
    pub fn queued_messages(&self) -> usize {
        self.handle.inner.backlog.queued()
    }

    /// A cloneable handle.
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.handle.local_addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Stop accepting; open connections run until they end.
        if let Some(t) = lock(&self.handle.tasks).take() {
            t.abort();
        }
    }
}

impl std::ops::Deref for Server {
    type Target = ServerHandle;
    fn deref(&self) -> &ServerHandle {
        &self.handle
    }
}

impl ServerHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The configuration in force.
    pub fn config(&self) -> &ServerConfig {
        &self.inner.cfg
    }

    fn live(&self, client_id: &str) -> Option<Arc<Shared>> {
        lock(self.inner.shard(client_id))
            .get(client_id)
            .map(|l| l.shared.clone())
    }

    /// Sends `msg` to `client_id`, waiting while its outbox is full. While the client is
    /// resuming, the message is queued (bounded by `outbox_bytes`) and sent after the resume.
    pub async fn send(&self, client_id: &str, msg: Bytes) -> Result<(), SendError> {
        // A session client may be between connections: its old connection ending, its
        // session about to be held. Retry for that short window instead of failing.
        let mut waited = Duration::ZERO;
        loop {
            let attached = match self.live(client_id) {
                Some(shared) => match shared.send(msg.clone()).await {
                    Ok(()) => return Ok(()),
                    Err(d) => {
                        if !lock(&self.inner.sessions).contains_key(client_id) {
                            return Err(SendError::Disconnected {
                                client_id: client_id.to_owned(),
                                reason: d.reason,
                            });
                        }
                        true
                    }
                },
                None => {
                    let mut sessions = lock(&self.inner.sessions);
                    match sessions.get_mut(client_id) {
                        Some(slot) if slot.held.is_some() => {
                            if slot.pending_bytes + msg.len() > self.inner.cfg.outbox_bytes {
                                return Err(SendError::Backlogged(client_id.to_owned()));
                            }
                            slot.pending_bytes += msg.len();
                            slot.pending.push_back(msg);
                            return Ok(());
                        }
                        Some(_) => true,
                        None => return Err(SendError::NotConnected(client_id.to_owned())),
                    }
                }
            };
            // The session is attached to a connection that is ending (or starting): wait.
            if attached && waited < Duration::from_secs(5) {
                tokio::time::sleep(Duration::from_millis(1)).await;
                waited += Duration::from_millis(1);
                continue;
            }
            return Err(SendError::NotConnected(client_id.to_owned()));
        }
    }

    /// Queues `msg` to every connected client without waiting; returns how many took it
    /// (a client whose outbox is full misses it).
    pub fn broadcast(&self, msg: Bytes) -> usize {
        let mut n = 0;
        for shard in &self.inner.shards {
            let targets: Vec<Arc<Shared>> =
                lock(shard).values().map(|l| l.shared.clone()).collect();
            n += targets.iter().filter(|s| s.try_send(msg.clone())).count();
        }
        n
    }

    /// Closes a client's connection with `code` and `text`; false when not connected.
    pub fn kick(&self, client_id: &str, code: CloseCode, text: &str) -> bool {
        match self.live(client_id) {
            Some(s) => {
                s.close(code, text);
                true
            }
            None => false,
        }
    }

    /// One client's presence and counters.
    pub fn client(&self, client_id: &str) -> Option<ClientInfo> {
        let stats = self.live(client_id).map(|s| s.stats.snapshot());
        let reg = lock(&self.inner.registry);
        reg.get(client_id).map(|e| ClientInfo {
            id: client_id.to_owned(),
            state: e.state.clone(),
            remote: e.remote,
            connected_since: e.connected_since,
            changed_at: e.changed_at,
            stats: if e.state.is_connected() { stats } else { None },
            connects: e.connects,
            disconnects: e.disconnects,
            conn_id: e.conn_id,
        })
    }

    /// Every known client (connected, resuming, and recently offline), sorted by id.
    pub fn clients(&self) -> Vec<ClientInfo> {
        let mut live: HashMap<String, StatsSnapshot> = HashMap::new();
        for shard in &self.inner.shards {
            for (id, l) in lock(shard).iter() {
                live.insert(id.clone(), l.shared.stats.snapshot());
            }
        }
        let reg = lock(&self.inner.registry);
        let mut out: Vec<ClientInfo> = reg
            .iter()
            .map(|(id, e)| ClientInfo {
                id: id.to_owned(),
                state: e.state.clone(),
                remote: e.remote,
                connected_since: e.connected_since,
                changed_at: e.changed_at,
                stats: if e.state.is_connected() {
                    live.get(id).copied()
                } else {
                    None
                },
                connects: e.connects,
                disconnects: e.disconnects,
                conn_id: e.conn_id,
            })
            .collect();
        drop(reg);
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Counts per presence state.
    pub fn presence_counts(&self) -> PresenceCounts {
        lock(&self.inner.registry).counts()
    }

    /// Subscribes to presence changes (a bounded broadcast; a slow subscriber sees `Lagged`).
    pub fn subscribe(&self) -> broadcast::Receiver<PresenceChange> {
        self.inner.presence_tx.subscribe()
    }

    /// Server-wide counters.
    pub fn metrics(&self) -> ServerMetrics {
        let t = &self.inner.totals;
        let mut m = ServerMetrics {
            connections: self.inner.open.load(Relaxed),
            presence: self.presence_counts(),
            disconnects: DisconnectReason::LABELS
                .iter()
                .zip(t.disconnects.iter())
                .map(|(l, c)| (*l, c.load(Relaxed)))
                .collect(),
            heartbeats_sent: t.heartbeats_sent.load(Relaxed),
            heartbeats_received: t.heartbeats_received.load(Relaxed),
            messages_received: t.messages_received.load(Relaxed),
            messages_sent: t.messages_sent.load(Relaxed),
            accepted: t.accepted.load(Relaxed),
            refused: t.refused.load(Relaxed),
        };
        // Add what live connections did so far (closed ones were folded into the totals).
        for shard in &self.inner.shards {
            for l in lock(shard).values() {
                let s = l.shared.stats.snapshot();
                m.heartbeats_sent += s.heartbeats_out;
                m.heartbeats_received += s.heartbeats_in;
                m.messages_received += s.messages_in;
                m.messages_sent += s.messages_out;
            }
        }
        m
    }

    /// Graceful shutdown: stop accepting, send CLOSE(going-away) to every client, wait up to
    /// `wait` for the connections to end, then drop the rest.
    pub async fn shutdown(&self, wait: Duration) {
        if let Some(t) = lock(&self.tasks).take() {
            t.abort();
        }
        self.inner.signals.shutdown.notify_one();
        for shard in &self.inner.shards {
            for l in lock(shard).values() {
                l.shared
                    .close(CloseCode::GOING_AWAY, "server shutting down");
            }
        }
        let deadline = tokio::time::Instant::now() + wait;
        while self.inner.open.load(Relaxed) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => {
                // Hard bound on file descriptors: beyond the limit plus a small allowance for
                // answering refusals, drop at once.
                if inner.open.load(Relaxed) >= inner.cfg.max_connections.saturating_add(64) {
                    inner.totals.refused.fetch_add(1, Relaxed);
                    continue;
                }
                inner.open.fetch_add(1, Relaxed);
                // Detached: aborting the accept loop (shutdown) must not abort connections,
                // which still have to send their CLOSE frames.
                tokio::spawn(run_connection(stream, remote, inner.clone()));
            }
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn run_connection(stream: TcpStream, remote: SocketAddr, inner: Arc<Inner>) {
    if let Err(e) = sockopt::apply(&stream, &inner.cfg.policy) {
        tracing::debug!(%remote, error = %e, "cannot set socket options");
    }
    let conn_id = inner.next_conn_id.fetch_add(1, Relaxed);
    let now = now();
    let cfg = ConnConfig {
        max_frame_len: inner.cfg.max_frame_len,
        handshake_timeout: inner.cfg.handshake_timeout,
        session: inner.cfg.session,
    };
    let conn = Conn::server(now, cfg);
    let shared = Shared::with_backlog(
        Limits {
            outbox_bytes: inner.cfg.outbox_bytes,
            inbox_bytes: usize::MAX,
        },
        inner.backlog.clone(),
    );
    let tag = Arc::new(Mutex::new(Tag::default()));
    let sink = ServerSink {
        inner: inner.clone(),
        conn_id,
        remote,
        client_id: None,
        session_id: None,
        shared: shared.clone(),
        tag: tag.clone(),
    };
    let ended = driver::drive(stream, Box::new(conn), shared.clone(), sink).await;
    let tag = std::mem::take(&mut *lock(&tag));
    if let Some(stream) = ended.handed_off {
        // A `tether probe` connection: the PROBE frame was its first frame.
        if let Some(req) = tag.probe {
            crate::probe::respond(stream, req).await;
        }
    }
    if let (Some(session), Some(id), Some(d)) = (ended.session, tag.client_id, tag.closed) {
        hold_session(&inner, &id, conn_id, session, &shared, d);
    }
    // Fold this connection's counters into the totals.
    let s = shared.stats.snapshot();
    let t = &inner.totals;
    t.heartbeats_sent.fetch_add(s.heartbeats_out, Relaxed);
    t.heartbeats_received.fetch_add(s.heartbeats_in, Relaxed);
    t.messages_received.fetch_add(s.messages_in, Relaxed);
    t.messages_sent.fetch_add(s.messages_out, Relaxed);
    inner.open.fetch_sub(1, Relaxed);
}

/// A session connection ended: hold its session for `session_linger` (the client shows
/// `Resuming`), unless a newer session replaced it, in which case its losses are reported.
fn hold_session(
    inner: &Inner,
    id: &str,
    conn_id: u64,
    session: Session,
    shared: &Shared,
    d: Disconnect,
) {
    let now = now();
    let unsent = shared.take_outbox();
    let linger = inner.cfg.session_linger.unwrap_or_default();
    // An orderly end (the client said goodbye, or this server closed it) ends the session:
    // nobody will resume it, so it is not held.
    let finished = matches!(
        d.reason,
        DisconnectReason::PeerClose {
            code: CloseCode::NORMAL,
            ..
        } | DisconnectReason::LocalClose
    );
    let held = {
        let mut sessions = lock(&inner.sessions);
        match sessions.get_mut(id) {
            Some(slot) if finished && slot.id == session.id() && slot.conn_id == conn_id => {
                sessions.remove(id);
                Some(session)
            }
            Some(slot)
                if slot.id == session.id() && slot.conn_id == conn_id && slot.held.is_none() =>
            {
                slot.pending_bytes += unsent.iter().map(Bytes::len).sum::<usize>();
                for m in unsent.iter().rev() {
                    slot.pending.push_front(m.clone());
                }
                slot.held = Some(session);
                None
            }
            _ => Some(session),
        }
    };
    match held {
        None => {
            inner.with_registry(|r| {
                r.disconnected(
                    now,
                    id,
                    conn_id,
                    d.reason.clone(),
                    d.silent_for,
                    Some(now + linger),
                )
            });
        }
        Some(session) => {
            // Finished, or replaced by a newer session: nothing will resume this one. Report
            // whatever it leaves undelivered (nothing, after a clean goodbye).
            inner.with_registry(|r| {
                r.disconnected(now, id, conn_id, d.reason.clone(), d.silent_for, None)
            });
            let unacked = session.unacked_range();
            if !(finished && unacked.is_none() && unsent.is_empty()) {
                let _ = inner.events.send(ServerEvent::SessionLost {
                    client_id: id.to_owned(),
                    unacked,
                    unsent,
                });
            }
        }
    }
}

/// What a connection task learns that its owner needs after the task ends.
#[derive(Default)]
struct Tag {
    client_id: Option<String>,
    probe: Option<Bytes>,
    /// Set for session connections: the registry update waits until the session is held.
    closed: Option<Disconnect>,
}

struct ServerSink {
    inner: Arc<Inner>,
    conn_id: u64,
    remote: SocketAddr,
    client_id: Option<String>,
    session_id: Option<u64>,
    shared: Arc<Shared>,
    tag: Arc<Mutex<Tag>>,
}

fn valid_client_id(id: &str) -> bool {
    !id.is_empty() && !id.chars().any(|c| c.is_control())
}

impl ServerSink {
    /// Decides the session part of a HELLO: `Ok(None)` without a session, `Ok(Some(..))` with
    /// a new or resumed one, `Err` for a refusal.
    fn session_for(
        &mut self,
        hello: &Hello,
    ) -> Result<Option<(SessionGrant, Session)>, (CloseCode, String)> {
        let inner = &self.inner;
        let Some(linger) = inner.cfg.session_linger else {
            if hello.resume.is_some() {
                return Err((
                    CloseCode::SESSION_UNKNOWN,
                    "sessions are disabled on this server".into(),
                ));
            }
            return Ok(None);
        };
        let id = &hello.client_id;
        if let Some(r) = &hello.resume {
            let mut sessions = lock(&inner.sessions);
            let Some(slot) = sessions.get_mut(id) else {
                return Err((
                    CloseCode::SESSION_UNKNOWN,
                    "unknown or expired session".into(),
                ));
            };
            // The token is compared in constant time, and before anything else is revealed.
            let token_ok = bool::from(subtle::ConstantTimeEq::ct_eq(&slot.token[..], &r.token[..]));
            if !token_ok || slot.id != r.session_id {
                return Err((
                    CloseCode::SESSION_UNKNOWN,
                    "unknown or expired session".into(),
                ));
            }
            let Some(session) = slot.held.take() else {
                // Still attached to the previous connection (the server has not noticed its
                // death yet): close it; the client retries and finds the session held.
                if let Some(live) = lock(inner.shard(id))
                    .get(id)
                    .filter(|l| l.conn_id == slot.conn_id)
                {
                    live.shared
                        .close(CloseCode::REPLACED, "session resumed on a newer connection");
                }
                return Err((
                    CloseCode::SESSION_BUSY,
                    "session still attached to the previous connection; retry".into(),
                ));
            };
            slot.conn_id = self.conn_id;
            slot.pending_bytes = 0;
            let pending: Vec<Bytes> = slot.pending.drain(..).collect();
            drop(sessions);
            self.shared.requeue_front(pending);
            self.session_id = Some(session.id());
            let grant = SessionGrant {
                session_id: session.id(),
                token: *session.token(),
                resumed: true,
                last_received: session.last_received(),
                linger,
            };
            return Ok(Some((grant, session)));
        }
        if !hello.want_session {
            return Ok(None);
        }
        let session_id = inner.next_session_id.fetch_add(1, Relaxed);
        let token = random_token();
        let old = lock(&inner.sessions).insert(
            id.clone(),
            SessionSlot {
                id: session_id,
                token,
                conn_id: self.conn_id,
                held: None,
                pending: VecDeque::new(),
                pending_bytes: 0,
            },
        );
        if let Some(mut old) = old {
            // The client started over: a held session of its will never resume.
            if let Some(s) = old.held.take() {
                let _ = inner.events.send(ServerEvent::SessionLost {
                    client_id: id.clone(),
                    unacked: s.unacked_range(),
                    unsent: old.pending.into_iter().collect(),
                });
            }
        }
        self.session_id = Some(session_id);
        let grant = SessionGrant {
            session_id,
            token,
            resumed: false,
            last_received: 0,
            linger,
        };
        Ok(Some((
            grant,
            Session::new(session_id, token, inner.cfg.session),
        )))
    }
}

impl Sink for ServerSink {
    fn hello(&mut self, now: Instant, hello: &Hello) -> Decision {
        let inner = self.inner.clone();
        if !valid_client_id(&hello.client_id) {
            return Decision::Refuse(
                CloseCode::BAD_HELLO,
                format!("invalid client id {:?}", hello.client_id),
            );
        }
        if inner.open.load(Relaxed) > inner.cfg.max_connections {
            return Decision::Refuse(
                CloseCode::SERVER_FULL,
                format!(
                    "server is at its limit of {} connections",
                    inner.cfg.max_connections
                ),
            );
        }
        let session = match self.session_for(hello) {
            Ok(s) => s,
            Err((code, text)) => return Decision::Refuse(code, text),
        };
        let id = hello.client_id.clone();
        // Register the new connection first, then close the one it replaces.
        let old = lock(inner.shard(&id)).insert(
            id.clone(),
            Live {
                conn_id: self.conn_id,
                shared: self.shared.clone(),
            },
        );
        let replaced = inner.with_registry(|r| r.connected(now, &id, self.conn_id, self.remote));
        if let Some(old) = old {
            old.shared.close(
                CloseCode::REPLACED,
                "replaced by a newer connection with the same client id",
            );
        }
        inner.totals.accepted.fetch_add(1, Relaxed);
        let _ = inner.events.send(ServerEvent::Connected {
            client_id: id.clone(),
            remote: self.remote,
            conn_id: self.conn_id,
            replaced,
        });
        lock(&self.tag).client_id = Some(id.clone());
        self.client_id = Some(id);
        Decision::Accept(
            liveness_config(&inner.cfg.policy, true),
            session.map(Box::new),
        )
    }

    fn event(&mut self, _shared: &Shared, ev: ConnEvent) {
        let inner = &self.inner;
        match ev {
            ConnEvent::Message { payload: msg, .. } => {
                if let Some(id) = &self.client_id {
                    inner.backlog.push();
                    let _ = inner.events.send(ServerEvent::Message {
                        client_id: id.clone(),
                        msg,
                    });
                }
            }
            ConnEvent::Suspect { .. } => {
                if let Some(id) = &self.client_id {
                    let now = now();
                    inner.with_registry(|r| r.suspect(now, id, self.conn_id));
                }
            }
            ConnEvent::Recovered { .. } => {
                if let Some(id) = &self.client_id {
                    let now = now();
                    inner.with_registry(|r| r.recovered(now, id, self.conn_id));
                }
            }
            ConnEvent::Resumed { replayed } => {
                if let Some(id) = &self.client_id {
                    let _ = inner.events.send(ServerEvent::Resumed {
                        client_id: id.clone(),
                        conn_id: self.conn_id,
                        replayed,
                    });
                }
            }
            ConnEvent::Closed(d) => {
                if let Some(i) = DisconnectReason::LABELS
                    .iter()
                    .position(|l| *l == d.reason.label())
                {
                    inner.totals.disconnects[i].fetch_add(1, Relaxed);
                }
                match &self.client_id {
                    Some(id) => {
                        {
                            let mut shard = lock(inner.shard(id));
                            if shard.get(id).is_some_and(|l| l.conn_id == self.conn_id) {
                                shard.remove(id);
                            }
                        }
                        if self.session_id.is_some() {
                            // Presence waits until the session is held (after the task ends).
                            lock(&self.tag).closed = Some(d.clone());
                        } else {
                            let now = now();
                            inner.with_registry(|r| {
                                r.disconnected(
                                    now,
                                    id,
                                    self.conn_id,
                                    d.reason.clone(),
                                    d.silent_for,
                                    None,
                                )
                            });
                        }
                        let _ = inner.events.send(ServerEvent::Disconnected {
                            client_id: id.clone(),
                            conn_id: self.conn_id,
                            disconnect: d,
                        });
                    }
                    None => {
                        inner.totals.refused.fetch_add(1, Relaxed);
                        let _ = inner.events.send(ServerEvent::Refused {
                            remote: self.remote,
                            reason: d.reason,
                        });
                    }
                }
            }
            ConnEvent::Probe(body) => lock(&self.tag).probe = Some(body),
            ConnEvent::Hello(_)
            | ConnEvent::Established(_)
            | ConnEvent::Rtt { .. }
            | ConnEvent::SessionLost { .. } => {}
        }
    }
}

/// The registry's single timer: Resuming → Offline at the linger's end, and forgetting old
/// Offline entries.
async fn expiry_loop(inner: std::sync::Weak<Inner>, signals: Arc<Signals>) {
    loop {
        let next = {
            // Hold only a weak reference between wake-ups so the server can be dropped.
            let Some(strong) = inner.upgrade() else {
                return;
            };
            let now = now();
            let mut reg = lock(&strong.registry);
            reg.handle_timeout(now);
            let changes: Vec<PresenceChange> = std::iter::from_fn(|| reg.poll_change()).collect();
            let next = reg.poll_timeout();
            drop(reg);
            strong.publish(changes);
            next
        };
        let sleep = async {
            match next {
                Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => {}
            _ = signals.registry_changed.notified() => {}
            _ = signals.shutdown.notified() => return,
        }
    }
}
