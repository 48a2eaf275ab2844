//! [`ServerConfig`]: every setting of a [`Server`](super::Server), built one way — with
//! [`ServerConfig::new`] and the setters below, each documenting its default.
//!
//! ## Memory
//!
//! What a server holds for its clients is bounded in bytes, server-wide:
//!
//! | what | bound (default) | when it is reached |
//! |---|---|---|
//! | received messages not yet taken from `next_event` | [`max_queued_bytes`](ServerConfig::max_queued_bytes) (32 MiB) | connections stop taking messages (TCP back-pressure; heartbeats and ACKs are still read and answered); each may hold one 512 B read of messages more |
//! | partially received frames | [`max_partial_frame_bytes`](ServerConfig::max_partial_frame_bytes) (32 MiB) | connections needing more pause reading |
//! | bytes queued for clients, not yet written or (with a session) not yet acknowledged | [`max_unsent_bytes`](ServerConfig::max_unsent_bytes) (64 MiB) | sends are refused (`SendError::ServerFull`) |
//! | the same, per client | [`outbox_bytes`](ServerConfig::outbox_bytes) (4 MiB) | the client is closed: `slow-consumer` |
//!
//! So a server holds at most 128 MiB of message data, plus a fixed cost per open
//! connection (about 4 KiB idle, measured by `tether bench hold`) and the process's own
//! baseline: with the default connection limit derived from an open-file limit of 20,000,
//! under 256 MiB in all. Kernel socket buffers are not counted (they are the kernel's).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tether_proto::presence::RegistryConfig;
use tether_proto::session::SessionConfig;
use tether_proto::Policy;

use super::handover::SessionSource;
use crate::auth::throttle::ThrottleConfig;
use crate::auth::Authorize;
use crate::tls::TlsServer;

/// Server settings. Build with [`ServerConfig::new`] and the setters; read back with the
/// `get_*` methods (the setters own the plain names, as in `std::process::Command`).
///
/// ```
/// use std::time::Duration;
/// use tether::{Policy, ServerConfig};
///
/// let policy = Policy::builder(Duration::from_secs(30)).build()?;
/// let cfg = ServerConfig::new("127.0.0.1:7300".parse()?)
///     .policy(policy)
///     .session_linger(Some(Duration::from_secs(60)))
///     .outbox_bytes(1 << 20);
/// assert_eq!(cfg.get_session_linger(), Some(Duration::from_secs(60)));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub(crate) listen: SocketAddr,
    pub(crate) policy: Policy,
    pub(crate) max_connections: Option<usize>,
    pub(crate) max_handshakes: usize,
    pub(crate) max_connections_per_source: Option<usize>,
    pub(crate) handshake_timeout: Duration,
    pub(crate) max_frame_len: u32,
    pub(crate) registry: RegistryConfig,
    pub(crate) outbox_bytes: usize,
    pub(crate) session_linger: Option<Duration>,
    pub(crate) session: SessionConfig,
    pub(crate) max_queued_bytes: usize,
    pub(crate) max_partial_frame_bytes: usize,
    pub(crate) max_unsent_bytes: usize,
    pub(crate) send_wait: Duration,
    pub(crate) tls: Option<Arc<TlsServer>>,
    pub(crate) authorize: Option<AuthHook>,
    pub(crate) session_source: Option<SourceHook>,
    pub(crate) throttle: Option<ThrottleConfig>,
    pub(crate) presence_events: bool,
    pub(crate) commit_acks: bool,
    pub(crate) park_idle: bool,
    /// Threads of the lot for parked connections (its own and its helpers); 0:
    /// [`default_park_threads`] of the runtime's workers.
    pub(crate) park_threads: usize,
}

/// The authorization hook, shared by every connection.
#[derive(Clone)]
pub(crate) struct AuthHook(pub(crate) Arc<dyn Authorize>);

impl std::fmt::Debug for AuthHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authorize(..)")
    }
}

/// The session source, shared by every connection.
#[derive(Clone)]
pub(crate) struct SourceHook(pub(crate) Arc<dyn SessionSource>);

impl std::fmt::Debug for SourceHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionSource(..)")
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7300)),
            policy: Policy::default(),
            max_connections: None,
            max_handshakes: 1024,
            max_connections_per_source: None,
            handshake_timeout: Duration::from_secs(10),
            max_frame_len: tether_proto::codec::DEFAULT_MAX_FRAME_LEN,
            registry: RegistryConfig::default(),
            outbox_bytes: 4 << 20,
            session_linger: Some(Duration::from_secs(30)),
            session: SessionConfig::default(),
            max_queued_bytes: 32 << 20,
            max_partial_frame_bytes: 32 << 20,
            max_unsent_bytes: 64 << 20,
            send_wait: Duration::from_secs(1),
            tls: None,
            authorize: None,
            session_source: None,
            throttle: Some(ThrottleConfig::default()),
            presence_events: false,
            commit_acks: false,
            park_idle: true,
            park_threads: 0,
        }
    }
}

/// Threads for parked connections on a runtime of `workers` worker threads: one per
/// worker, at least one. They run one lot: its thread alone waits on the parked sockets and
/// their deadlines, so a burst of idle heartbeats wakes one thread and is answered in one
/// batch; the others help with the wake-ups from handles (a send, a close) when more than
/// one waits, so sends to parked clients are written by as many threads. Measured on 2
/// workers (BENCHMARKS.md, 2026-12-01, tenth to thirteenth passes): 6-10 % less CPU per idle
/// heartbeat than a lot of its own per worker, which woke each lot for its share of a
/// burst (eleventh pass). One thread alone answers idle heartbeats for the same CPU (its
/// helpers sleep: alternated rounds at 19,000 idle clients in the same half hour put the
/// default at 0.70x and 0.78x mosquitto's, one thread at 0.73x and 0.77x, fourteenth
/// pass), but it writes every send itself, and
/// under a sustained ~30,000-40,000 sends/s through the HTTP API to 10,000 clients sends waited
/// 26-102 ms at the median instead of 2-6 ms. One thread waits on every parked socket: at
/// ~10 us an idle heartbeat here, that is about 95,000 heartbeats a second a node.
pub fn default_park_threads(workers: usize) -> usize {
    workers.max(1)
}

/// The default connection limit: the open-file limit minus room for connections in the
/// handshake and for everything else the process opens (listeners, the status page, logs).
pub fn default_max_connections(max_handshakes: usize) -> usize {
    match crate::sockopt::open_files_limit() {
        Some(n) => {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            let reserve = max_handshakes.saturating_add((n / 20).max(256));
            n.saturating_sub(reserve).max(64)
        }
        None => 100_000,
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

    /// Sets the address to listen on. Default: `127.0.0.1:7300`.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Sets the liveness policy applied to every client (the WELCOME dictates its heartbeat
    /// interval and dead-after; its socket options apply to every accepted socket).
    /// Default: `Policy::default()`.
    pub fn policy(mut self, p: Policy) -> Self {
        self.policy = p;
        self
    }

    /// Sets the limit on established connections: beyond it a HELLO is refused with
    /// `server-full`. Connections still in the handshake do not count (see
    /// [`max_handshakes`](Self::max_handshakes)). Default: derived from the open-file limit
    /// (`RLIMIT_NOFILE`) minus `max_handshakes` minus 5 % (at least 256) for everything
    /// else; 100,000 where there is no such limit.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = Some(n.max(1));
        self
    }

    /// Sets the limit on connections still in the handshake (accepted, no HELLO yet). When
    /// it is reached, the oldest such connection is refused (`server-full`) to make room: a
    /// real client completes its handshake in one round trip, a silent socket is always the
    /// oldest. Default: 1,024.
    pub fn max_handshakes(mut self, n: usize) -> Self {
        self.max_handshakes = n.max(1);
        self
    }

    /// Sets the limit on open connections (in the handshake or established) from one IP
    /// address; beyond it new connections from that address are closed at once.
    /// Default: an eighth of `max_connections`, at least 64.
    pub fn max_connections_per_source(mut self, n: usize) -> Self {
        self.max_connections_per_source = Some(n.max(1));
        self
    }

    /// Sets the handshake deadline: a client must complete its HELLO within this.
    /// Default: 10 s.
    pub fn handshake_timeout(mut self, t: Duration) -> Self {
        self.handshake_timeout = t;
        self
    }

    /// Sets the longest frame accepted. Default: 1 MiB.
    pub fn max_frame_len(mut self, n: u32) -> Self {
        self.max_frame_len = n;
        self
    }

    /// Sets the presence registry's retention of offline clients. Default:
    /// `RegistryConfig::default()` (10 minutes, at most 10,000 entries).
    pub fn registry(mut self, r: RegistryConfig) -> Self {
        self.registry = r;
        self
    }

    /// Sets the bound on bytes queued for one client and not yet taken by it: not yet
    /// written to its socket, or, with a session, not yet acknowledged. A send that would
    /// pass it closes the client with CLOSE(slow-consumer) and reason `slow-consumer`
    /// (one message larger than the bound still goes alone). For a client that is resuming,
    /// it bounds what waits for the resume (`SendError::Backlogged` beyond it).
    /// Default: 4 MiB.
    pub fn outbox_bytes(mut self, n: usize) -> Self {
        self.outbox_bytes = n.max(1);
        self
    }

    /// Sets how long a client's session is held after its connection ends, so it can resume
    /// without losing or duplicating a message (`None` disables sessions). Default: 30 s.
    pub fn session_linger(mut self, linger: Option<Duration>) -> Self {
        self.session_linger = linger;
        self
    }

    /// Sets the session replay bounds and ACK timing. Default: `SessionConfig::default()`.
    pub fn session_config(mut self, cfg: SessionConfig) -> Self {
        self.session = cfg;
        self
    }

    /// Sets the bound on received messages waiting in `Server::next_event`, in bytes: above
    /// it connections stop taking messages until the application has taken half of it (TCP
    /// back-pressure to the clients). They still read heartbeats and ACKs, 512 B at a time,
    /// and stop at the first message, which waits in the connection (so the bound may be
    /// passed by at most 512 B of payload per connection); nobody is declared dead
    /// meanwhile. The paused connections are woken 32 at a time as the application drains
    /// it. Default: 32 MiB.
    pub fn max_queued_bytes(mut self, n: usize) -> Self {
        self.max_queued_bytes = n.max(1);
        self
    }

    /// Sets the bound on partially received frames over all connections, in bytes: a
    /// connection that would need more pauses reading until there is room. A frame in
    /// progress is charged twice its length (the worst case of its buffer), so the bound is
    /// raised to at least twice the maximum frame length plus 32 KiB. Default: 32 MiB.
    pub fn max_partial_frame_bytes(mut self, n: usize) -> Self {
        self.max_partial_frame_bytes = n.max(1);
        self
    }

    /// Sets the bound on bytes queued for all clients and not yet taken by them (see
    /// [`outbox_bytes`](Self::outbox_bytes)): a send that does not fit fails with
    /// `SendError::ServerFull` (`ServerHandle::send` waits for room, at most
    /// [`send_wait`](Self::send_wait)). Default: 64 MiB.
    pub fn max_unsent_bytes(mut self, n: usize) -> Self {
        self.max_unsent_bytes = n.max(1);
        self
    }

    /// Sets the longest `ServerHandle::send` waits: for a client at its bound to take bytes
    /// (then it is closed as a slow consumer), for a resuming client's backlog, or for room
    /// in the server-wide budget. `try_send` never waits. Default: 1 s.
    pub fn send_wait(mut self, t: Duration) -> Self {
        self.send_wait = t;
        self
    }

    /// Speaks TLS on every accepted connection with `tls`'s certificate (and, when it has a
    /// client CA, requires client certificates: mutual TLS). The acceptor is taken from `tls`
    /// per connection, so [`TlsServer::reload`] (on SIGHUP) applies to the next handshake
    /// while established connections keep theirs. The TLS handshake runs on the
    /// connection's own task, counts as part of the tether handshake (the
    /// [`handshake_timeout`](Self::handshake_timeout) covers both) and holds one of the
    /// [`max_handshakes`](Self::max_handshakes) slots. A client that speaks plain tether
    /// to it is refused with BAD_HELLO ("this server requires TLS"). Default: none (plain
    /// TCP).
    pub fn tls(mut self, tls: Arc<TlsServer>) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Judges every HELLO with `hook` (and every in-band credential refresh with its
    /// [`refresh`](Authorize::refresh)): a client is accepted only as a principal the hook
    /// allows, for a client id that principal may use, and only the same principal may
    /// replace the id's connection, resume its session or take over a held one (REFUSE 18
    /// ID_NOT_ALLOWED otherwise). No credential or a bad one is REFUSE 17 UNAUTHORIZED;
    /// both are decided before any state of the client id is touched. A connection is
    /// closed with CLOSE(CREDENTIAL_EXPIRED) when its principal's credential runs out,
    /// unless the client refreshed it. The hook may answer later
    /// ([`AuthDecision::Pending`](crate::auth::AuthDecision::Pending)) for checks that need
    /// I/O. Use [`Builtin`](crate::auth::Builtin) for JWT and mutual TLS. Default: none
    /// (every client is anonymous; any connection may take over any id).
    pub fn authorize(mut self, hook: Arc<dyn Authorize>) -> Self {
        self.authorize = Some(AuthHook(hook));
        self
    }

    /// Asks `source` for a session this server does not hold when a HELLO resumes it (a
    /// session held by another node of a cluster): the handshake waits for the fetch (at
    /// most the handshake timeout), the session is installed as held here, and the normal
    /// resume check runs. Nothing found → REFUSE SESSION_UNKNOWN as without a source. See
    /// [`handover`](super::handover). Default: none.
    pub fn session_source(mut self, source: Arc<dyn SessionSource>) -> Self {
        self.session_source = Some(SourceHook(source));
        self
    }

    /// Commit-before-ACK: every session acknowledges the client's messages only up to what
    /// the application [`commit`](super::ServerHandle::commit)ted, so a client keeps (and
    /// replays on its next resume) every message the application could still lose — a
    /// cluster node that mirrors them elsewhere first (`tether serve --durable-sessions`).
    /// The application must commit every message it receives, or the client's replay
    /// buffer fills and its sends wait. Default: off (ACKs follow what was received).
    pub fn ack_after_commit(mut self, on: bool) -> Self {
        self.commit_acks = on;
        self
    }

    /// Throttles failed attempts per source address (refused credentials, resumes with a
    /// wrong token or by another principal): past the limit the address's HELLOs that carry
    /// a credential or a resume (all of them when [`authorize`](Self::authorize) is set)
    /// are refused with REFUSE 19 THROTTLED until its bucket refills. `None` turns it off.
    /// Default: `ThrottleConfig::default()` (10 failures, then one per 6 s).
    pub fn auth_throttle(mut self, cfg: Option<ThrottleConfig>) -> Self {
        self.throttle = cfg;
        self
    }

    /// The TLS configuration, if the server speaks TLS.
    pub fn get_tls(&self) -> Option<&Arc<TlsServer>> {
        self.tls.as_ref()
    }

    /// The authorization hook, if any (for layers that add their own checks, such as a
    /// gateway's webhook, around it).
    pub fn get_authorize(&self) -> Option<Arc<dyn Authorize>> {
        self.authorize.as_ref().map(|h| h.0.clone())
    }

    /// Sets whether presence changes also come out of `Server::next_event` as
    /// `ServerEvent::Presence`, in order with the client's other events and never dropped
    /// (what a consumer that must not miss one needs: `tether serve`'s event stream).
    /// [`ServerHandle::subscribe`](super::ServerHandle::subscribe) has them either way, but
    /// drops them for a subscriber that lags. Default: false.
    pub fn presence_events(mut self, on: bool) -> Self {
        self.presence_events = on;
        self
    }

    /// Sets whether idle plain-TCP connections are parked: kept without a tokio task of
    /// their own, on the server's lot threads (see [`park_threads`](Self::park_threads)),
    /// which answer their heartbeats, fire their deadlines and give them a task again when
    /// they have work (issue 17: less memory and fewer task wake-ups per idle client).
    /// Nothing a client or the application sees changes. TLS connections always keep their
    /// task. Default: true.
    pub fn park_idle(mut self, on: bool) -> Self {
        self.park_idle = on;
        self
    }

    /// Sets how many threads run the lot that holds the parked connections: its own, which
    /// waits on their sockets and deadlines, and `n - 1` helpers for the wake-ups from
    /// handles (see [`default_park_threads`]). 0, the default: [`default_park_threads`] of
    /// the runtime's worker threads, one per worker. One alone answers idle heartbeats for
    /// the same CPU, but writes every send to a parked client itself.
    pub fn park_threads(mut self, n: usize) -> Self {
        self.park_threads = n;
        self
    }

    /// The lot threads a server on a runtime of `workers` worker threads starts (when
    /// [`park_idle`](Self::park_idle) is on).
    pub fn get_park_threads(&self, workers: usize) -> usize {
        match self.park_threads {
            0 => default_park_threads(workers),
            n => n,
        }
    }

    /// The address to listen on.
    pub fn get_listen(&self) -> SocketAddr {
        self.listen
    }

    /// The liveness policy.
    pub fn get_policy(&self) -> &Policy {
        &self.policy
    }

    /// How long sessions are held (`None`: sessions are off).
    pub fn get_session_linger(&self) -> Option<Duration> {
        self.session_linger
    }

    /// The connection limit in force (the derived default unless set).
    pub fn get_max_connections(&self) -> usize {
        self.max_connections
            .unwrap_or_else(|| default_max_connections(self.max_handshakes))
    }

    /// The per-source limit in force (the derived default unless set).
    pub fn get_max_connections_per_source(&self) -> usize {
        self.max_connections_per_source
            .unwrap_or_else(|| (self.get_max_connections() / 8).max(64))
    }

    /// The bound on partially received frames in force.
    pub fn get_max_partial_frame_bytes(&self) -> usize {
        let one_frame = 2 * (self.max_frame_len as usize + tether_proto::codec::HEADER_LEN);
        self.max_partial_frame_bytes.max(one_frame + (32 << 10))
    }

    /// The limit on connections in the handshake.
    pub fn get_max_handshakes(&self) -> usize {
        self.max_handshakes
    }

    /// The per-client bound on bytes not yet taken.
    pub fn get_outbox_bytes(&self) -> usize {
        self.outbox_bytes
    }
}
