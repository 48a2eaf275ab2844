//! [`Server`]: accepts tether clients, knows who is online and why each one left.
//!
//! ```text
//!  accept loop (accept.rs: fd, per-source and handshake limits)
//!     └─▶ a task per connection with work: driver (Conn::server, ServerSink)
//!           ⇅ idle plain-TCP connections park in the server's lot (driver/park.rs: one task,
//!             no task per connection) and get their task back when they have work
//!           │ HELLO ──────────▶ lifecycle: connect | replace | resume   (client's shard lock)
//!           │ Message ────────▶ events channel ──▶ Server::next_event   (no lock; backlog budget)
//!           │ Suspect/Recovered ▶ presence registry                      (registry lock)
//!           └ task ended ─────▶ lifecycle: hold the session | offline    (client's shard lock)
//!  expiry task: the registry's one timer ──▶ lifecycle: expire a held session
//!  ServerHandle::send ──▶ lifecycle: the client's connection or held session (never waits on
//!                         a socket; a client that does not read is closed: slow-consumer)
//! ```
//!
//! Locks, in the order they may be taken (never the other way round):
//! 1. a client's shard (`lifecycle::Clients`, 32 shards by client id): its lifecycle record;
//! 2. the presence registry (`Inner::registry`): presence view and its single timer;
//! 3. one connection's shared state (`driver::Shared`): its outbox and commands.
//!
//! Admission (`accept::Admission`), the budgets' waiter lists and the lot's ready list are
//! leaves: nothing else is
//! taken while they are held. Waiting is by notification: `send` waits on `Signals::room`
//! and the unsent budget, `shutdown` on `Signals::conn_ended`.

mod accept;
mod config;
mod events;
pub mod handover;
mod lifecycle;
mod metrics;
mod sessions;
mod thin;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tether_proto::presence::{
    PresenceChange, PresenceCounts, PresenceKind, PresenceState, Registry,
};
use tether_proto::{CloseCode, ConnConfig, LivenessConfig};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, Notify};

pub use config::{default_max_connections, default_park_threads, ServerConfig};
pub use events::{
    Broadcast, ClientId, ClientInfo, ClientPage, Delivery, SendError, ServerEvent, ServerMetrics,
};

use crate::auth::throttle::FailureThrottle;
use crate::driver::{self, Budgets, Command, StatsSnapshot};
use accept::Admission;
use handover::{ImportError, SessionExport, SessionRequest};
use lifecycle::{lock, Clients, Take};
use metrics::Totals;

/// Everything the server's tasks and handles share.
pub(crate) struct Inner {
    cfg: ServerConfig,
    /// `cfg.max_connections` resolved (the derived default unless set).
    max_connections: usize,
    /// What every connection's state machine is built with, shared (one allocation per
    /// server, not per connection).
    conn_cfg: Arc<ConnConfig>,
    /// The liveness settings every accepted connection runs with, shared likewise.
    liveness: Arc<LivenessConfig>,
    clients: Clients,
    registry: Mutex<Registry<thin::ThinId>>,
    admission: Admission,
    budgets: Arc<Budgets>,
    /// What every connection's shared state is built with (its limits, the budgets): one
    /// allocation per server, not per connection.
    conn_settings: Arc<driver::Settings>,
    events: mpsc::UnboundedSender<ServerEvent>,
    presence_tx: broadcast::Sender<PresenceChange>,
    signals: Arc<Signals>,
    totals: Totals,
    /// Open connections (handshaking included).
    open: AtomicUsize,
    /// Connections whose HELLO was accepted and that have not ended.
    established: AtomicUsize,
    next_conn_id: AtomicU64,
    next_session_id: AtomicU64,
    /// Failed attempts per source address (a leaf lock: nothing is taken while it is held).
    throttle: Option<Mutex<FailureThrottle>>,
    /// Idle plain-TCP connections, kept without a task (`driver/park.rs`): one lot, run by
    /// one thread per worker thread of the runtime by default
    /// ([`ServerConfig::park_threads`]: the lot's thread and its helpers). Empty when
    /// [`ServerConfig::park_idle`] is off (or a lot cannot be had).
    lot: Option<Arc<driver::Lot<crate::transport::Tcp, accept::ServerSink>>>,
}

/// Wake-ups, kept outside `Inner` so the expiry task can wait on them while holding only a
/// weak reference to the server.
#[derive(Default)]
struct Signals {
    /// The registry changed: its next deadline may be earlier.
    registry_changed: Notify,
    shutdown: Notify,
    /// A connection ended (shutdown waits for the last; the accept loop, out of file
    /// descriptors, for any).
    conn_ended: Notify,
    /// A resuming client's backlog may have room (it resumed, or its hold ended).
    room: Notify,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.signals.shutdown.notify_one();
    }
}

/// A running server. Take events with [`next_event`](Server::next_event); use
/// [`handle`](Server::handle) to send, query and shut down from anywhere.
///
/// ```no_run
/// use bytes::Bytes;
/// use tether::{Server, ServerConfig, ServerEvent};
///
/// # async fn run() -> std::io::Result<()> {
/// let mut server = Server::bind(ServerConfig::new("127.0.0.1:7300".parse().unwrap())).await?;
/// let handle = server.handle();
/// while let Some(ev) = server.next_event().await {
///     match ev {
///         ServerEvent::Connected { client_id, remote, .. } => println!("{client_id} from {remote}"),
///         // Echo: never waits on the client's socket (a client that does not read is
///         // closed as a slow consumer).
///         ServerEvent::Message { client_id, msg, .. } => {
///             let _ = handle.try_send(&client_id, msg);
///         }
///         ServerEvent::Disconnected { client_id, disconnect, .. } => {
///             println!("{client_id} left: {}", disconnect.reason)
///         }
///         _ => {}
///     }
/// }
/// # Ok(())
/// # }
/// ```
pub struct Server {
    handle: ServerHandle,
    events: mpsc::UnboundedReceiver<ServerEvent>,
}

/// A cloneable handle to a running server.
#[derive(Clone)]
pub struct ServerHandle {
    inner: Arc<Inner>,
    local_addr: SocketAddr,
    accept: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
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

    /// Starts accepting on an already bound listener (`cfg`'s listen address is ignored).
    pub fn from_listener(listener: TcpListener, cfg: ServerConfig) -> Server {
        let local_addr = listener.local_addr().unwrap_or(cfg.listen);
        let (tx, rx) = mpsc::unbounded_channel();
        let (presence_tx, _) = broadcast::channel(4096);
        let cfg_throttle = cfg.throttle;
        let park_idle = cfg.park_idle;
        let park_threads =
            cfg.get_park_threads(tokio::runtime::Handle::current().metrics().num_workers());
        let budgets = Arc::new(Budgets::new(
            cfg.max_queued_bytes,
            cfg.get_max_partial_frame_bytes(),
            cfg.max_unsent_bytes,
        ));
        let inner = Arc::new(Inner {
            max_connections: cfg.get_max_connections(),
            conn_cfg: Arc::new(ConnConfig {
                max_frame_len: cfg.max_frame_len,
                handshake_timeout: cfg.handshake_timeout,
                session: cfg.session,
            }),
            liveness: Arc::new(crate::connection::liveness_config(&cfg.policy, true)),
            registry: Mutex::new(Registry::keyed(cfg.registry)),
            conn_settings: driver::Settings::server(
                driver::Limits {
                    outbox_bytes: cfg.outbox_bytes,
                    // The server takes its connections' messages as they come (the backlog
                    // budget bounds them): no inbox.
                    inbox_bytes: usize::MAX,
                },
                budgets.clone(),
            ),
            budgets,
            cfg,
            clients: Clients::new(),
            admission: Admission::default(),
            events: tx,
            presence_tx,
            signals: Arc::new(Signals::default()),
            totals: Totals::default(),
            open: AtomicUsize::new(0),
            established: AtomicUsize::new(0),
            next_conn_id: AtomicU64::new(1),
            next_session_id: AtomicU64::new(first_session_id()),
            throttle: cfg_throttle.map(|t| Mutex::new(FailureThrottle::new(t))),
            // One lot: its thread waits on every parked socket and deadline, its helpers
            // share the sends (see `driver::park`).
            lot: park_idle
                .then(|| driver::Lot::threaded(accept::unpark, park_threads))
                .flatten(),
        });
        let accept = tokio::spawn(accept::accept_loop(listener, inner.clone()));
        tokio::spawn(expiry_loop(Arc::downgrade(&inner), inner.signals.clone()));
        Server {
            handle: ServerHandle {
                inner,
                local_addr,
                accept: Arc::new(Mutex::new(Some(accept))),
            },
            events: rx,
        }
    }

    /// The next event; `None` after shutdown.
    ///
    /// Drain it: received messages wait here, and above
    /// [`max_queued_bytes`](ServerConfig::max_queued_bytes) connections stop taking messages
    /// until the application catches up (they still read and answer heartbeats and ACKs, so
    /// no client is declared dead for it). Drain it within tokio's cooperative budget, not in
    /// `tokio::task::unconstrained`: a loop that never yields while events keep coming holds
    /// its worker thread, and every connection task queued on that worker — timers and
    /// heartbeat answers included — waits until it stops (seconds under load, measured).
    pub async fn next_event(&mut self) -> Option<ServerEvent> {
        let ev = self.events.recv().await;
        if let Some(ServerEvent::Message { msg, .. }) = &ev {
            self.handle.inner.budgets.backlog.give(msg.len());
        }
        ev
    }

    /// Bytes of received messages waiting in [`next_event`](Self::next_event).
    pub fn queued_bytes(&self) -> usize {
        self.handle.inner.budgets.backlog.used()
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
        if let Some(t) = lock(&self.handle.accept).take() {
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

    /// The threads this server parks idle plain-TCP connections on
    /// ([`ServerConfig::park_threads`]); 0 with [`ServerConfig::park_idle`] off.
    pub fn park_threads(&self) -> usize {
        self.inner.lot.as_ref().map_or(0, |l| l.threads())
    }

    /// The configuration in force.
    pub fn config(&self) -> &ServerConfig {
        &self.inner.cfg
    }

    /// Queues `msg` for `client_id` without waiting: on its connection, or — while it is
    /// resuming — in its held session, sent after the resume.
    ///
    /// Never waits on the client's socket. A client whose queued bytes would pass
    /// [`outbox_bytes`](ServerConfig::outbox_bytes) is closed with reason `slow-consumer`
    /// ([`SendError::SlowConsumer`]); a resuming client at that bound gives
    /// [`SendError::Backlogged`]; a spent server-wide budget gives [`SendError::ServerFull`].
    pub fn try_send(&self, client_id: &str, msg: Bytes) -> Result<(), SendError> {
        self.inner.try_send(client_id, msg, true).map(|_| ())
    }

    /// [`try_send`](Self::try_send) that says what happened: the client's session and the
    /// sequence number the message carries in it (the number the client acknowledges and a
    /// [`ServerEvent::SessionLost`] names), and whether it waits in a held session for the
    /// client's resume. A message longer than a frame carries is refused
    /// ([`SendError::TooLarge`]).
    pub fn try_deliver(&self, client_id: &str, msg: Bytes) -> Result<Delivery, SendError> {
        self.inner.try_send(client_id, msg, true)
    }

    /// [`try_deliver`](Self::try_deliver) only if the message gets number `seq` of
    /// `session` (see [`next_seq`](Self::next_seq)); otherwise nothing is queued
    /// ([`SendError::Renumbered`]). For a layer that records each message with its number
    /// somewhere else *before* the client can receive it (a durable copy), sending to the
    /// client one message at a time.
    pub fn try_deliver_at(
        &self,
        client_id: &str,
        msg: Bytes,
        session: u64,
        seq: u64,
    ) -> Result<Delivery, SendError> {
        self.inner.try_send_at(client_id, msg, session, seq)
    }

    /// The session and sequence number the next message queued for `client_id` would get
    /// (`None`: no session, or not connected and not held).
    pub fn next_seq(&self, client_id: &str) -> Option<(u64, u64)> {
        self.inner.next_seq(client_id)
    }

    /// Commit-before-ACK ([`ServerConfig::ack_after_commit`]): the application made
    /// `client_id`'s messages up to `seq` of `session` durable; its session may acknowledge
    /// them now. Cheap (one lock, one wake-up of the connection's task; commits coalesce).
    /// Ignored for another session than the client's current one.
    pub fn commit(&self, client_id: &str, session: u64, seq: u64) {
        self.inner.commit(driver::now(), client_id, session, seq);
    }

    /// The client's session and the highest number the client acknowledged in it, as of
    /// its connection's last wake-up (`None` without a session). For trimming a copy of
    /// the unacknowledged messages kept elsewhere.
    pub fn session_acked(&self, client_id: &str) -> Option<(u64, u64)> {
        self.inner.session_acked(client_id)
    }

    /// The client's current session as an export that carries its identity only: client
    /// and session ids, principal, the hashes of the resume tokens that work now (never a
    /// token) — with the numbers zero and no messages. What a durable copy of the session
    /// rewrites at every transition (a new session, a resume here: the token rotates); the
    /// copy supplies the numbers and messages ([`SessionExport::with_state`]). Does not
    /// take or disturb the session.
    pub fn session_header(&self, client_id: &str) -> Option<SessionExport> {
        self.inner.session_header(client_id)
    }

    /// Like [`try_send`](Self::try_send), but waits — by notification, at most
    /// [`send_wait`](ServerConfig::send_wait) — while the client's queue is at its bound
    /// (then, still full, the client is closed as a slow consumer), while it is resuming with
    /// a full backlog, or while the server-wide budget is spent. So a producer gets
    /// back-pressure from a client that is briefly slow, and no caller waits on one client's
    /// socket longer than `send_wait`.
    pub async fn send(&self, client_id: &str, msg: Bytes) -> Result<(), SendError> {
        // First without waiting for anything: the usual case costs one attempt, not two
        // notifications registered and dropped and a clock read per message.
        match self.inner.try_send(client_id, msg.clone(), false) {
            Err(SendError::SlowConsumer(_) | SendError::ServerFull | SendError::Backlogged(_)) => {}
            r => return r.map(|_| ()),
        }
        let deadline = tokio::time::Instant::now() + self.inner.cfg.send_wait;
        loop {
            // Registered before trying, so a wake-up between the try and the wait counts.
            let room = self.inner.signals.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            // The connection's "bytes taken" notification, registered before the attempt too.
            let live = self.inner.clients.live_of(client_id);
            let watch = live.as_ref().map(|s| s.watch());
            let drained = watch.as_ref().map(|w| w.notified());
            tokio::pin!(drained);
            if let Some(n) = drained.as_mut().as_pin_mut() {
                n.enable();
            }
            match self.inner.try_send(client_id, msg.clone(), false) {
                Err(SendError::SlowConsumer(id)) => {
                    // At its bound: wait for the connection to take bytes, then try again;
                    // out of time, the client is a slow consumer after all.
                    let waited = match drained.as_mut().as_pin_mut() {
                        Some(n) => tokio::time::timeout_at(deadline, n).await.is_ok(),
                        None => false,
                    };
                    if !waited {
                        return match self.inner.try_send(client_id, msg, true) {
                            Err(SendError::SlowConsumer(_)) => Err(SendError::SlowConsumer(id)),
                            r => r.map(|_| ()),
                        };
                    }
                }
                Err(SendError::ServerFull) => {
                    let budget = self.inner.budgets.unsent.take_when_room(msg.len());
                    if tokio::time::timeout_at(deadline, budget).await.is_err() {
                        return Err(SendError::ServerFull);
                    }
                    // The room was taken for us; give it back and queue for real.
                    self.inner.budgets.unsent.give(msg.len());
                }
                Err(SendError::Backlogged(id)) => {
                    if tokio::time::timeout_at(deadline, room).await.is_err() {
                        return Err(SendError::Backlogged(id));
                    }
                }
                r => return r.map(|_| ()),
            }
        }
    }

    /// Queues `msg` to every connected client, and into the held session of every resuming
    /// one, without waiting; says how many took it. A client that does not read is closed as
    /// a slow consumer (see [`try_send`](Self::try_send)). Fails only for a message longer
    /// than a frame carries.
    pub fn broadcast(&self, msg: Bytes) -> Result<Broadcast, SendError> {
        self.inner.broadcast(msg)
    }

    /// Hands the session `req` names over to another server (which asked for it through its
    /// [`SessionSource`](handover::SessionSource)): `None` unless this server has session
    /// `req.session_id` of `req.client_id`, owned by `req.principal`, whose resume token
    /// hashes to `req.token_hash` (a wrong token moves nothing, disturbs nothing).
    ///
    /// A held session is taken at once: the client goes `offline` here with reason
    /// `replaced`, no [`ServerEvent::SessionLost`] (it moved), and its messages leave this
    /// server's unsent budget. A session still attached to a connection (this server has
    /// not noticed its death yet) is taken when that connection, closed with
    /// CLOSE(REPLACED, "session resumed on another node"), has ended: waited for by
    /// notification, at most `wait`. If the wait runs out first, the session is reported
    /// lost here when the connection ends.
    pub async fn take_session(
        &self,
        req: &SessionRequest,
        wait: Duration,
    ) -> Option<SessionExport> {
        match self.inner.take(driver::now(), req) {
            Take::No => None,
            Take::Taken(e) => Some(*e),
            Take::Wait(rx) => tokio::time::timeout(wait, rx).await.ok()?.ok(),
        }
    }

    /// Installs a session another server handed over as held here (for
    /// [`session_linger`](ServerConfig::session_linger); the client is `resuming`): the
    /// client's next HELLO resumes it with the normal check. A session of the same
    /// principal held here for the id is older (the client moved on) and is reported lost.
    /// Fails when sessions are off, or the client id has a connection here or another
    /// principal's session; the export is then reported lost ([`ServerEvent::SessionLost`]),
    /// so nothing vanishes.
    pub fn import_session(&self, export: SessionExport) -> Result<(), ImportError> {
        let remote = SocketAddr::from(([0, 0, 0, 0], 0));
        self.inner.import(driver::now(), export, None, remote)
    }

    /// Closes a client's connection with `code` and `text` (after what is queued for it);
    /// false when not connected.
    pub fn kick(&self, client_id: &str, code: CloseCode, text: &str) -> bool {
        match self.inner.clients.live_of(client_id) {
            Some(s) => {
                s.close(code, text);
                true
            }
            None => false,
        }
    }

    /// One client's presence and counters.
    pub fn client(&self, client_id: &str) -> Option<ClientInfo> {
        let live = self
            .inner
            .clients
            .live_of(client_id)
            .map(|s| s.stats.snapshot());
        let session = self.inner.clients.session_of(client_id);
        let reg = lock(&self.inner.registry);
        reg.get(client_id)
            .map(|e| client_info(client_id, &e, live, session))
    }

    /// Every known client (connected, resuming, and recently offline), sorted by id (without
    /// session ids; see [`clients_page`](Self::clients_page) for a page that has them).
    pub fn clients(&self) -> Vec<ClientInfo> {
        let live: std::collections::HashMap<String, StatsSnapshot> = self
            .inner
            .clients
            .live()
            .into_iter()
            .map(|(id, s, _)| (id, s.stats.snapshot()))
            .collect();
        let reg = lock(&self.inner.registry);
        let mut out: Vec<ClientInfo> = reg
            .iter()
            .map(|(id, e)| client_info(id, &e, live.get(id).copied(), None))
            .collect();
        drop(reg);
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// One page of clients in id order: at most `limit` after the id `after`, only those in
    /// state `kind` when given. Costs O(log n + limit) whatever the number of clients (the
    /// registry keeps ids sorted, per state too); pass the page's `next_cursor` as `after`
    /// for the next one. Stable while clients come and go: no client is skipped or shown
    /// twice because another appeared.
    pub fn clients_page(
        &self,
        kind: Option<PresenceKind>,
        after: Option<&str>,
        limit: usize,
    ) -> ClientPage {
        let reg = lock(&self.inner.registry);
        let counts = reg.counts();
        let (entries, more) = reg.page(kind, after, limit);
        let entries: Vec<(String, tether_proto::presence::Entry)> = entries
            .into_iter()
            .map(|(id, e)| (id.to_owned(), e))
            .collect();
        drop(reg);
        // Live counters after the registry lock (lock order: a shard before the registry).
        let clients: Vec<ClientInfo> = entries
            .iter()
            .map(|(id, e)| {
                let live = e
                    .state
                    .is_connected()
                    .then(|| self.inner.clients.live_of(id))
                    .flatten()
                    .map(|s| s.stats.snapshot());
                let session = matches!(
                    e.state,
                    PresenceState::Online | PresenceState::Suspect | PresenceState::Resuming { .. }
                )
                .then(|| self.inner.clients.session_of(id))
                .flatten();
                client_info(id, e, live, session)
            })
            .collect();
        let next_cursor = more.then(|| clients.last().map(|c| c.id.clone())).flatten();
        ClientPage {
            matching: kind.map_or(counts.total(), |k| counts.get(k)),
            counts,
            clients,
            next_cursor,
        }
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
        self.inner.metrics()
    }

    /// Graceful shutdown: stop accepting, send CLOSE(going-away) to every client (REFUSE to
    /// those still in the handshake), wait up to `wait` for the connections to end, then
    /// leave the rest to end on their own.
    pub async fn shutdown(&self, wait: Duration) {
        if let Some(t) = lock(&self.accept).take() {
            t.abort();
        }
        self.inner.signals.shutdown.notify_one();
        for shared in self.inner.admission.pending() {
            shared.command(Command::Refuse(
                CloseCode::GOING_AWAY,
                "server shutting down".into(),
            ));
        }
        for (_, shared, _) in self.inner.clients.live() {
            shared.close(CloseCode::GOING_AWAY, "server shutting down");
        }
        let all_ended = async {
            loop {
                let ended = self.inner.signals.conn_ended.notified();
                if self.inner.open.load(Relaxed) == 0 {
                    return;
                }
                ended.await;
            }
        };
        let _ = tokio::time::timeout(wait, all_ended).await;
    }
}

/// The first session id of this server: a random number in `[1, 2^52]` from the OS (the
/// server counts up from it), so that session ids of two servers — a cluster's nodes, or one
/// server and its restart — do not repeat each other's: a consumer that keys messages by
/// `(client id, session, seq)` is not fooled by a restart or by a client that moves to
/// another node. Two servers' ranges of a million sessions each overlap with a probability
/// of about 2^-31; ids stay below 2^53, exact in every JSON parser. (Until 2026-12 the first
/// id was the start's wall-clock milliseconds × 1000: two servers started in the same
/// millisecond, or a thousand sessions apart, handed out the same ids.)
fn first_session_id() -> u64 {
    crate::random::u64() % (1 << 52) + 1
}

/// A client as queries see it: presence from the registry, counters from the live
/// connection or, when there is none, the last one's.
fn client_info(
    id: &str,
    e: &tether_proto::presence::Entry,
    live: Option<StatsSnapshot>,
    session: Option<u64>,
) -> ClientInfo {
    let stats = if e.state.is_connected() {
        live
    } else {
        let last_rx = match &e.state {
            PresenceState::Offline { at, silent_for, .. }
            | PresenceState::Resuming { at, silent_for, .. } => at.checked_sub(*silent_for),
            _ => None,
        };
        e.last_counters
            .map(|c| StatsSnapshot::from_counters(c, last_rx))
    };
    ClientInfo {
        id: id.to_owned(),
        state: e.state.clone(),
        remote: e.remote,
        connected_since: e.connected_since,
        changed_at: e.changed_at,
        stats,
        connects: e.connects,
        disconnects: e.disconnects,
        conn_id: e.conn_id,
        session,
    }
}

/// The registry's single timer: Resuming → Offline at the linger's end (the lifecycle then
/// drops the held session), and forgetting old Offline entries.
async fn expiry_loop(inner: std::sync::Weak<Inner>, signals: Arc<Signals>) {
    loop {
        let next = {
            // Hold only a weak reference between wake-ups so the server can be dropped.
            let Some(strong) = inner.upgrade() else {
                return;
            };
            let now = driver::now();
            let mut reg = lock(&strong.registry);
            reg.handle_timeout(now);
            let changes = lifecycle::drain_changes(&mut reg);
            let next = reg.poll_timeout();
            drop(reg);
            for (ch, remote) in changes {
                let expired = matches!(ch.from, Some(PresenceState::Resuming { .. }))
                    && matches!(ch.to, PresenceState::Offline { .. });
                let id = ch.id.clone();
                // The client goes offline, then its session is reported lost.
                strong.publish(ch, remote);
                if expired {
                    strong.expire(now, &id);
                }
            }
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

#[cfg(test)]
mod session_id_tests {
    /// Servers started together (a cluster's nodes, a test's two servers) count from
    /// different random starts: the ids stay distinct and below 2^53 (exact in JSON).
    #[test]
    fn first_session_ids_are_random_distinct_and_exact_in_json() {
        let starts: std::collections::HashSet<u64> =
            (0..1000).map(|_| super::first_session_id()).collect();
        assert_eq!(starts.len(), 1000, "two servers started together share ids");
        assert!(starts.iter().all(|&s| (1..=1 << 52).contains(&s)));
        // Spread over the range, not clustered at one end.
        assert!(starts.iter().any(|&s| s > 1 << 51) && starts.iter().any(|&s| s < 1 << 51));
    }
}
