//! [`Proxy`]: a single-ended TCP sidecar that gives an unmodified program's connections the
//! liveness they lack, and [`relay`], the two-leg copy loop it runs per connection.
//!
//! ```text
//!  program ──▶ client leg ──▶ tether proxy ──▶ upstream leg ──▶ server
//!              keepalive +     │ one task per     keepalive +
//!              USER_TIMEOUT    │ connection:      USER_TIMEOUT
//!                              │  pump c→u ─┐
//!                              │  pump u→c ─┼─ first fault ends both legs
//!                              │  error watch ×2, idle timer
//! ```
//!
//! # What it guarantees
//!
//! - **Both legs carry the policy's socket options**: `TCP_NODELAY`, TCP keepalive (idle,
//!   interval, count) and `TCP_USER_TIMEOUT` from [`Policy`] (see [`sockopt::apply`]), set on
//!   the upstream socket *before* `connect`, so the user timeout also bounds the handshake.
//!   The keepalive keeps a NAT or load balancer on either leg from forgetting an idle flow
//!   (idle ≤ path/3) and detects a vanished peer within `detect_within`.
//! - **When a leg dies, the other one learns at once.** The end is classified
//!   ([`DisconnectReason`]) and the other leg is closed:
//!
//!   | cause on one leg                                 | reason              | other leg gets |
//!   |--------------------------------------------------|---------------------|----------------|
//!   | FIN (orderly close, possibly a half-close)       | —                   | FIN (`shutdown(Write)`), the other direction keeps flowing |
//!   | both directions closed by FIN                    | `peer-closed`       | — (both already got their FIN) |
//!   | RST, `EPIPE`, `ECONNABORTED`                     | `peer-reset`        | RST            |
//!   | `ETIMEDOUT` after unanswered keepalive probes    | `keepalive-timeout` | RST            |
//!   | `ETIMEDOUT` with data unacknowledged             | `user-timeout`      | RST            |
//!   | no byte either way for `idle_timeout`            | `idle-timeout`      | RST (both legs)|
//!   | any other socket error                           | `io-error`          | RST            |
//!
//!   RST is `SO_LINGER` 0 then close ([`sockopt::set_abortive_close`]): the program behind the
//!   other leg gets `ECONNRESET` on its next call instead of waiting, and no kernel keeps
//!   retransmitting into a dead path.
//! - **Half-closes are forwarded**: a FIN from one side becomes `shutdown(Write)` towards the
//!   other, and the opposite direction keeps flowing until it closes too (request/response
//!   programs that `shutdown(SHUT_WR)` after the request keep working).
//! - **A leg that dies while we are not reading from it is still noticed**: after a FIN from
//!   the client, the proxy no longer reads the client socket, and a later RST or keepalive
//!   timeout on it would only show up on the next write. An error-readiness watch on each
//!   socket (`EPOLLERR`) catches it at once.
//!
//! `keepalive-timeout` vs `user-timeout`: both surface as `ETIMEDOUT`. Linux counts keepalive
//! probes in `icsk_probes_out` and retransmissions in `icsk_retransmits`; both survive the
//! abort and `TCP_INFO` reports them (`tcpi_probes`, `tcpi_retransmits`), while
//! `tcpi_unacked` is already zero (the write queue is purged). See [`classify_timeout`].
//!
//! # Copying: splice through a pipe, allocated only while data moves
//!
//! On Linux each direction moves bytes with `splice(2)`: socket → pipe → socket, so payload
//! never crosses into user space (one pair of syscalls per up to 64 KiB, no copy into a
//! buffer). Elsewhere, or with [`CopyMode::Buffer`], each direction uses one 64 KiB heap
//! buffer, read with `try_read_buf` (no zeroing).
//!
//! Either way the channel (pipe or buffer) is created lazily when the source socket turns
//! readable, kept while the direction is busy (so request/response traffic and bursts reuse
//! it), and **given back once the direction has moved nothing for
//! [`CHANNEL_RELEASE_AFTER`]** (1 s). An idle connection, the common case for the programs
//! this protects, therefore holds its two sockets and no buffer, no pipe: memory per
//! connection is bounded by 2 × 64 KiB (plus two pipes, four fds) while data moves, and a few
//! hundred bytes of task state when idle. The price is one timer registration per wait while
//! a channel is held. If a pipe cannot be created (for example `EMFILE`), that direction falls
//! back to the buffer.
//!
//! Why splice by default: it never copies payload into user space. On loopback it moved
//! about 1.3× what the buffer moved on one connection (2–3× socat) and added the same
//! round-trip latency for 64-byte messages (≈ 6 µs per pass, like socat); see
//! `benches/proxy.rs` and `docs/PROXY.md`. `CopyMode::Buffer` is there for kernels or
//! sandboxes without splice.
//!
//! Each direction reads only when its channel is empty and drains it completely before reading
//! again, so a slow receiver stops the proxy reading from the sender: TCP flow control
//! propagates end to end, and no direction buffers more than one channel.
//!
//! # What it does not do
//!
//! It does not carry liveness *end to end* (the program behind each leg still only learns what
//! TCP tells it; the proxy only makes TCP tell it promptly) and it cannot keep a program's
//! connection alive across a broken path: that needs a peer on the other side, which is what
//! the tunnel does. It does not parse the stream, add TLS, or balance across upstreams.
//!
//! `TCP_USER_TIMEOUT` also ends a connection whose receiver advertises a zero window for
//! longer than the timeout (a stalled, not dead, program); choose `detect_within` with that
//! in mind. Writes to a reset socket return `EPIPE`; Rust programs ignore `SIGPIPE` by default,
//! which this module relies on (`splice` to a socket does not pass `MSG_NOSIGNAL` on every
//! kernel).

use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use socket2::SockRef;
use tether_proto::{DisconnectReason, Policy};
use thiserror::Error;
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::sockopt;

/// Size of one direction's channel: the buffer, or the amount asked of one `splice` (the
/// default pipe capacity is 64 KiB).
pub const CHANNEL_BYTES: usize = 64 * 1024;

/// A direction that has moved nothing for this long gives its channel (pipe or buffer) back.
pub const CHANNEL_RELEASE_AFTER: Duration = Duration::from_secs(1);

/// How a direction moves its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CopyMode {
    /// `splice(2)` through a pipe (Linux only; elsewhere it behaves as [`CopyMode::Buffer`]).
    Splice,
    /// `read`/`write` through a 64 KiB heap buffer.
    Buffer,
}

impl Default for CopyMode {
    /// [`CopyMode::Splice`] on Linux, [`CopyMode::Buffer`] elsewhere.
    fn default() -> Self {
        if cfg!(target_os = "linux") {
            CopyMode::Splice
        } else {
            CopyMode::Buffer
        }
    }
}

impl CopyMode {
    /// `"splice"` or `"buffer"`.
    pub fn label(self) -> &'static str {
        match self {
            CopyMode::Splice => "splice",
            CopyMode::Buffer => "buffer",
        }
    }
}

/// One side of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Leg {
    /// Between the program that connected and the proxy.
    Client,
    /// Between the proxy and the upstream server.
    Upstream,
}

impl Leg {
    /// `"client"` or `"upstream"`.
    pub fn label(self) -> &'static str {
        match self {
            Leg::Client => "client",
            Leg::Upstream => "upstream",
        }
    }

    fn other(self) -> Leg {
        match self {
            Leg::Client => Leg::Upstream,
            Leg::Upstream => Leg::Client,
        }
    }
}

/// The reasons a proxied connection can end with, in the order of [`ProxyMetrics::closed`].
pub const PROXY_REASONS: [&str; 6] = [
    "peer-closed",
    "peer-reset",
    "keepalive-timeout",
    "user-timeout",
    "idle-timeout",
    "io-error",
];

/// Options of [`relay`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RelayOptions {
    /// No byte in either direction for this long ends the connection with RST on both legs.
    /// `None` disables. Default: `None`.
    pub idle_timeout: Option<Duration>,
    /// How bytes are moved. Default: [`CopyMode::default`].
    pub copy: CopyMode,
}

/// How a relayed connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayEnd {
    /// Why it ended: `peer-closed` (both directions closed by FIN) or a failure.
    pub reason: DisconnectReason,
    /// The leg whose event ended it (for `peer-closed`, the leg that closed *last*); `None`
    /// for `idle-timeout`, which concerns both.
    pub leg: Option<Leg>,
    /// For `peer-closed`: the leg that sent the first FIN.
    pub first_fin: Option<Leg>,
    /// Both legs were closed with RST (`SO_LINGER` 0), because the cause was a failure.
    pub abortive: bool,
    /// Bytes written to the upstream leg (client → upstream).
    pub bytes_up: u64,
    /// Bytes written to the client leg (upstream → client).
    pub bytes_down: u64,
    /// From the start of the relay to its end.
    pub duration: Duration,
}

/// Settings of a [`Proxy`]. Build with [`ProxyConfig::new`] and the setters.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Where programs connect.
    pub listen: SocketAddr,
    /// Where every accepted connection is forwarded.
    pub upstream: SocketAddr,
    /// Socket options of both legs (keepalive, `TCP_USER_TIMEOUT`) and the optional
    /// `idle_timeout`. Heartbeat fields are not used: the proxy speaks plain TCP.
    /// Default: `Policy::default()` (detect within 30 s).
    pub policy: Policy,
    /// Connecting upstream must finish within this; otherwise the client gets RST.
    /// Default: `None`, meaning the policy's `detect_within`.
    pub connect_timeout: Option<Duration>,
    /// Connections open at once; more are accepted and reset at once. Default: 10,000.
    pub max_connections: usize,
    /// How bytes are moved. Default: [`CopyMode::default`].
    pub copy: CopyMode,
}

impl ProxyConfig {
    /// Defaults, forwarding `listen` to `upstream`.
    pub fn new(listen: SocketAddr, upstream: SocketAddr) -> Self {
        ProxyConfig {
            listen,
            upstream,
            policy: Policy::default(),
            connect_timeout: None,
            max_connections: 10_000,
            copy: CopyMode::default(),
        }
    }
    /// Sets the policy. Default: `Policy::default()`.
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }
    /// Sets the upstream connect timeout. Default: the policy's `detect_within`.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }
    /// Sets the connection limit (at least 1). Default: 10,000.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }
    /// Sets the copy mode. Default: [`CopyMode::default`].
    pub fn copy(mut self, copy: CopyMode) -> Self {
        self.copy = copy;
        self
    }

    fn effective_connect_timeout(&self) -> Duration {
        self.connect_timeout.unwrap_or(self.policy.detect_within)
    }
}

/// Errors of [`Proxy::bind`].
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The listening socket could not be created.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The policy is invalid.
    #[error("invalid policy")]
    Policy(#[from] tether_proto::policy::PolicyError),
}

/// Something that happened to a proxied connection, reported to [`Proxy::run`]'s callback.
#[derive(Debug)]
#[non_exhaustive]
pub enum ProxyEvent {
    /// Both legs are up and bytes are being relayed.
    Opened {
        /// Connection number (from 1, per proxy).
        id: u64,
        /// The program's address.
        client: SocketAddr,
        /// The proxy's local address on the upstream leg.
        via: SocketAddr,
    },
    /// A relayed connection ended.
    Closed {
        /// Connection number.
        id: u64,
        /// The program's address.
        client: SocketAddr,
        /// How it ended.
        end: RelayEnd,
    },
    /// The connection could not be set up (upstream refused or timed out, or a socket option
    /// could not be set); the client leg was closed with RST.
    SetupFailed {
        /// Connection number.
        id: u64,
        /// The program's address.
        client: SocketAddr,
        /// Which leg failed.
        leg: Leg,
        /// What failed.
        error: io::Error,
    },
    /// The connection limit was reached; the new connection was reset.
    Rejected {
        /// The program's address.
        client: SocketAddr,
        /// The limit.
        limit: usize,
    },
    /// `accept` failed (for example out of file descriptors); retried after 100 ms.
    AcceptFailed {
        /// The error.
        error: io::Error,
    },
}

/// Counters of a [`Proxy`] (see [`Proxy::handle`] and [`ProxyHandle::metrics`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyMetrics {
    /// Connections being relayed now.
    pub open: u64,
    /// Connections accepted since start (including rejected and failed ones).
    pub accepted: u64,
    /// Relayed connections that ended, by leg (`[client, upstream, neither]`, the last for
    /// `idle-timeout`) and reason (indexed like [`PROXY_REASONS`]).
    pub closed: [[u64; PROXY_REASONS.len()]; 3],
    /// Connections whose setup failed (upstream unreachable, socket options).
    pub setup_failed: u64,
    /// Connections reset because the limit was reached.
    pub rejected: u64,
    /// Bytes relayed client → upstream (counted as they are written, live).
    pub bytes_up: u64,
    /// Bytes relayed upstream → client.
    pub bytes_down: u64,
    /// Channels (pipes or buffers, each up to [`CHANNEL_BYTES`]) held now: at most two per
    /// busy connection, none for an idle one.
    pub channels: u64,
}

impl ProxyMetrics {
    /// Ended connections with reason `label`, summed over legs.
    pub fn closed_with(&self, label: &str) -> u64 {
        PROXY_REASONS
            .iter()
            .position(|l| *l == label)
            .map(|i| self.closed.iter().map(|row| row[i]).sum())
            .unwrap_or(0)
    }
}

/// Live counters shared by the accept loop, every connection and [`ProxyHandle`]s.
#[derive(Debug, Default)]
struct Counters {
    open: AtomicUsize,
    accepted: AtomicU64,
    closed: [[AtomicU64; PROXY_REASONS.len()]; 3],
    setup_failed: AtomicU64,
    rejected: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    channels: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> ProxyMetrics {
        let mut closed = [[0u64; PROXY_REASONS.len()]; 3];
        for (row, src) in closed.iter_mut().zip(&self.closed) {
            for (c, s) in row.iter_mut().zip(src) {
                *c = s.load(Relaxed);
            }
        }
        ProxyMetrics {
            open: self.open.load(Relaxed) as u64,
            accepted: self.accepted.load(Relaxed),
            closed,
            setup_failed: self.setup_failed.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            bytes_up: self.bytes_up.load(Relaxed),
            bytes_down: self.bytes_down.load(Relaxed),
            channels: self.channels.load(Relaxed),
        }
    }

    fn record_end(&self, end: &RelayEnd) {
        let row = match end.leg {
            Some(Leg::Client) => 0,
            Some(Leg::Upstream) => 1,
            None => 2,
        };
        let label = end.reason.label();
        let col = PROXY_REASONS
            .iter()
            .position(|l| *l == label)
            .unwrap_or(PROXY_REASONS.len() - 1); // anything else counts as io-error
        self.closed[row][col].fetch_add(1, Relaxed);
    }
}

/// A cheap handle to a running proxy's counters.
#[derive(Debug, Clone)]
pub struct ProxyHandle {
    counters: Arc<Counters>,
}

impl ProxyHandle {
    /// A snapshot of the counters.
    pub fn metrics(&self) -> ProxyMetrics {
        self.counters.snapshot()
    }
}

/// A bound proxy; [`Proxy::run`] serves it.
#[derive(Debug)]
pub struct Proxy {
    listener: TcpListener,
    cfg: ProxyConfig,
    counters: Arc<Counters>,
}

impl Proxy {
    /// Validates the policy and binds the listening socket.
    pub async fn bind(cfg: ProxyConfig) -> Result<Proxy, ProxyError> {
        cfg.policy.validate()?;
        let listener =
            TcpListener::bind(cfg.listen)
                .await
                .map_err(|source| ProxyError::Listen {
                    addr: cfg.listen,
                    source,
                })?;
        Ok(Proxy {
            listener,
            cfg,
            counters: Arc::default(),
        })
    }

    /// The address the proxy accepts on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        // A bound listener always has a local address; fall back to the configured one.
        self.listener.local_addr().unwrap_or(self.cfg.listen)
    }

    /// A handle to the counters, usable while [`Proxy::run`] runs.
    pub fn handle(&self) -> ProxyHandle {
        ProxyHandle {
            counters: Arc::clone(&self.counters),
        }
    }

    /// Accepts and relays connections until the future is dropped, reporting every event to
    /// `on_event` (called from connection tasks: keep it quick and non-blocking). Dropping
    /// the future aborts every connection task; their sockets are closed normally.
    pub async fn run<F>(self, on_event: F)
    where
        F: Fn(ProxyEvent) + Send + Sync + 'static,
    {
        let on_event = Arc::new(on_event);
        let cfg = Arc::new(self.cfg);
        let mut tasks = JoinSet::new();
        let mut next_id = 0u64;
        loop {
            tokio::select! {
                accepted = self.listener.accept() => {
                    let (client, addr) = match accepted {
                        Ok(a) => a,
                        Err(error) => {
                            on_event(ProxyEvent::AcceptFailed { error });
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    self.counters.accepted.fetch_add(1, Relaxed);
                    if self.counters.open.load(Relaxed) >= cfg.max_connections {
                        self.counters.rejected.fetch_add(1, Relaxed);
                        let _ = sockopt::set_abortive_close(&client);
                        drop(client);
                        on_event(ProxyEvent::Rejected { client: addr, limit: cfg.max_connections });
                        continue;
                    }
                    next_id += 1;
                    self.counters.open.fetch_add(1, Relaxed);
                    let guard = OpenGuard(Arc::clone(&self.counters));
                    tasks.spawn(handle_connection(
                        next_id,
                        client,
                        addr,
                        Arc::clone(&cfg),
                        guard,
                        Arc::clone(&on_event),
                    ));
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
    }
}

/// Decrements the open count when a connection task ends, however it ends.
struct OpenGuard(Arc<Counters>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

async fn handle_connection<F>(
    id: u64,
    client: TcpStream,
    addr: SocketAddr,
    cfg: Arc<ProxyConfig>,
    guard: OpenGuard,
    on_event: Arc<F>,
) where
    F: Fn(ProxyEvent) + Send + Sync + 'static,
{
    let counters = &guard.0;
    let fail = |leg: Leg, error: io::Error, client: TcpStream| {
        counters.setup_failed.fetch_add(1, Relaxed);
        let _ = sockopt::set_abortive_close(&client);
        drop(client);
        on_event(ProxyEvent::SetupFailed {
            id,
            client: addr,
            leg,
            error,
        });
    };
    if let Err(e) = sockopt::apply(&client, &cfg.policy) {
        return fail(Leg::Client, e, client);
    }
    let upstream = match connect_upstream(&cfg).await {
        Ok(u) => u,
        Err(e) => return fail(Leg::Upstream, e, client),
    };
    let via = upstream.local_addr().unwrap_or(cfg.upstream);
    on_event(ProxyEvent::Opened {
        id,
        client: addr,
        via,
    });
    let opts = RelayOptions {
        idle_timeout: cfg.policy.idle_timeout,
        copy: cfg.copy,
    };
    let end = relay_counted(client, upstream, &opts, Some(counters)).await;
    counters.record_end(&end);
    on_event(ProxyEvent::Closed {
        id,
        client: addr,
        end,
    });
}

async fn connect_upstream(cfg: &ProxyConfig) -> io::Result<TcpStream> {
    let sock = if cfg.upstream.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Before connect: TCP_USER_TIMEOUT then also bounds the SYN retransmissions.
    sockopt::apply(&sock, &cfg.policy)?;
    let limit = cfg.effective_connect_timeout();
    match tokio::time::timeout(limit, sock.connect(cfg.upstream)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "connect to {} timed out after {}",
                cfg.upstream,
                tether_proto::duration::Human(limit)
            ),
        )),
    }
}

/// Relays bytes between `client` and `upstream` until the connection ends, closes both legs
/// (RST on both when the cause was a failure) and reports how it ended. Socket options are
/// the caller's business (see [`sockopt::apply`]).
pub async fn relay(client: TcpStream, upstream: TcpStream, opts: &RelayOptions) -> RelayEnd {
    relay_counted(client, upstream, opts, None).await
}

/// Why a pump or watch stopped with a fault.
struct Fault {
    leg: Leg,
    error: io::Error,
}

/// What one select round of the relay produced.
enum Step {
    /// A direction finished in order (its source sent FIN, forwarded).
    DirectionDone(Leg),
    Fault(Fault),
    IdleCheck,
}

async fn relay_counted(
    client: TcpStream,
    upstream: TcpStream,
    opts: &RelayOptions,
    global: Option<&Counters>,
) -> RelayEnd {
    let start = Instant::now();
    let activity = Activity {
        start,
        last_ms: AtomicU64::new(0),
    };
    let up_bytes = AtomicU64::new(0);
    let down_bytes = AtomicU64::new(0);
    let (g_up, g_down, g_channels) = match global {
        Some(c) => (Some(&c.bytes_up), Some(&c.bytes_down), Some(&c.channels)),
        None => (None, None, None),
    };
    // The pumps and watches borrow both sockets; they are dropped at the end of this block,
    // before the sockets are closed.
    let (reason, leg, failure, first_fin) = {
        let up = Direction {
            src: &client,
            dst: &upstream,
            src_leg: Leg::Client,
            moved: &up_bytes,
            global: g_up,
            channels: g_channels,
            activity: &activity,
            mode: opts.copy,
        };
        let down = Direction {
            src: &upstream,
            dst: &client,
            src_leg: Leg::Upstream,
            moved: &down_bytes,
            global: g_down,
            channels: g_channels,
            activity: &activity,
            mode: opts.copy,
        };
        let mut up_pump = pin!(up.run());
        let mut down_pump = pin!(down.run());
        let mut client_err = pin!(watch_error(&client, Leg::Client));
        let mut upstream_err = pin!(watch_error(&upstream, Leg::Upstream));
        let idle = opts.idle_timeout;
        let mut idle_sleep = pin!(tokio::time::sleep_until(start + idle.unwrap_or_default()));
        let (mut up_done, mut down_done) = (false, false);
        let mut first_fin = None;

        let (reason, leg, failure) = loop {
            let step = std::future::poll_fn(|cx| {
                if !up_done {
                    if let Poll::Ready(r) = up_pump.as_mut().poll(cx) {
                        return Poll::Ready(match r {
                            Ok(()) => Step::DirectionDone(Leg::Client),
                            Err(f) => Step::Fault(f),
                        });
                    }
                }
                if !down_done {
                    if let Poll::Ready(r) = down_pump.as_mut().poll(cx) {
                        return Poll::Ready(match r {
                            Ok(()) => Step::DirectionDone(Leg::Upstream),
                            Err(f) => Step::Fault(f),
                        });
                    }
                }
                if let Poll::Ready(f) = client_err.as_mut().poll(cx) {
                    return Poll::Ready(Step::Fault(f));
                }
                if let Poll::Ready(f) = upstream_err.as_mut().poll(cx) {
                    return Poll::Ready(Step::Fault(f));
                }
                if idle.is_some() && idle_sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Step::IdleCheck);
                }
                Poll::Pending
            })
            .await;
            match step {
                Step::DirectionDone(leg) => {
                    match leg {
                        Leg::Client => up_done = true,
                        Leg::Upstream => down_done = true,
                    }
                    first_fin.get_or_insert(leg);
                    if up_done && down_done {
                        break (DisconnectReason::PeerClosed, Some(leg), false);
                    }
                }
                Step::Fault(f) => {
                    let sock = match f.leg {
                        Leg::Client => &client,
                        Leg::Upstream => &upstream,
                    };
                    break (classify(&f.error, sock), Some(f.leg), true);
                }
                Step::IdleCheck => {
                    // Lazy timer: activity only records a timestamp; re-check here.
                    let limit = idle.unwrap_or_default();
                    let deadline = activity.last() + limit;
                    if Instant::now() >= deadline {
                        break (DisconnectReason::IdleTimeout, None, true);
                    }
                    idle_sleep.as_mut().reset(deadline);
                }
            }
        };
        (reason, leg, failure, first_fin)
    };
    if failure {
        // RST on both legs: the failed one is gone anyway, the other must learn now.
        let _ = sockopt::set_abortive_close(&client);
        let _ = sockopt::set_abortive_close(&upstream);
    }
    drop(client);
    drop(upstream);
    RelayEnd {
        reason,
        leg,
        first_fin: if failure { None } else { first_fin },
        abortive: failure,
        bytes_up: up_bytes.load(Relaxed),
        bytes_down: down_bytes.load(Relaxed),
        duration: start.elapsed(),
    }
}

/// When the connection last moved a byte, as milliseconds since `start` (lock-free, shared by
/// both directions of one connection).
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Relaxed);
    }
    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Relaxed))
    }
}

/// Resolves when `sock` reports an error (`EPOLLERR`), with that error.
async fn watch_error(sock: &TcpStream, leg: Leg) -> Fault {
    loop {
        if let Err(error) = sock.ready(Interest::ERROR).await {
            return Fault { leg, error };
        }
        let taken = sock.try_io(Interest::ERROR, || match sock.take_error()? {
            Some(e) => Ok(e),
            // Readiness without a pending error: clear it and wait again.
            None => Err(io::ErrorKind::WouldBlock.into()),
        });
        match taken {
            Ok(error) => return Fault { leg, error },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Fault { leg, error },
        }
    }
}

/// One direction of a relayed connection.
struct Direction<'a> {
    src: &'a TcpStream,
    dst: &'a TcpStream,
    src_leg: Leg,
    moved: &'a AtomicU64,
    global: Option<&'a AtomicU64>,
    channels: Option<&'a AtomicU64>,
    activity: &'a Activity,
    mode: CopyMode,
}

impl Direction<'_> {
    /// Copies until the source sends FIN (then forwards it and returns `Ok`) or a socket
    /// fails.
    async fn run(self) -> Result<(), Fault> {
        let src_fault = |error| Fault {
            leg: self.src_leg,
            error,
        };
        let dst_fault = |error| Fault {
            leg: self.src_leg.other(),
            error,
        };
        let mut chan: Option<Held<'_>> = None;
        loop {
            // Fill: the channel is empty here. It is created only when the source is readable.
            let filled = self.src.try_io(Interest::READABLE, || {
                let ch =
                    chan.get_or_insert_with(|| Held::new(Channel::new(self.mode), self.channels));
                ch.fill(self.src)
            });
            let n = match filled {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Keep the channel for the next burst or reply for a moment; give it
                    // back once the direction has been idle for CHANNEL_RELEASE_AFTER.
                    if chan.is_some() {
                        match tokio::time::timeout(CHANNEL_RELEASE_AFTER, self.src.readable()).await
                        {
                            Ok(r) => {
                                r.map_err(src_fault)?;
                                continue;
                            }
                            Err(_) => chan = None,
                        }
                    }
                    self.src.readable().await.map_err(src_fault)?;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(src_fault(e)),
            };
            if n == 0 {
                // FIN from the source: forward it, keep the other direction going.
                SockRef::from(self.dst)
                    .shutdown(Shutdown::Write)
                    .map_err(dst_fault)?;
                return Ok(());
            }
            // Drain completely before reading again (flow control end to end).
            let Some(Held { chan: ch, .. }) = chan.as_mut() else {
                // `fill` returned bytes, so the closure ran and created the channel.
                continue;
            };
            while !ch.is_empty() {
                let wrote = self.dst.try_io(Interest::WRITABLE, || ch.drain(self.dst));
                match wrote {
                    Ok(w) => {
                        self.moved.fetch_add(w as u64, Relaxed);
                        if let Some(g) = self.global {
                            g.fetch_add(w as u64, Relaxed);
                        }
                        self.activity.touch();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.dst.writable().await.map_err(dst_fault)?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(dst_fault(e)),
                }
            }
        }
    }
}

/// A channel, counted in [`ProxyMetrics::channels`] while it exists.
struct Held<'a> {
    chan: Channel,
    gauge: Option<&'a AtomicU64>,
}

impl<'a> Held<'a> {
    fn new(chan: Channel, gauge: Option<&'a AtomicU64>) -> Self {
        if let Some(g) = gauge {
            g.fetch_add(1, Relaxed);
        }
        Held { chan, gauge }
    }

    fn fill(&mut self, src: &TcpStream) -> io::Result<usize> {
        self.chan.fill(src)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(g) = self.gauge {
            g.fetch_sub(1, Relaxed);
        }
    }
}

/// Where one direction's bytes sit between read and write.
enum Channel {
    #[cfg(target_os = "linux")]
    Pipe(splice::Pipe),
    Buffer(Buffer),
}

impl Channel {
    fn new(mode: CopyMode) -> Channel {
        #[cfg(target_os = "linux")]
        if mode == CopyMode::Splice {
            // No pipe (EMFILE, ENFILE): copy through a buffer for this burst instead.
            if let Ok(p) = splice::Pipe::new() {
                return Channel::Pipe(p);
            }
        }
        let _ = mode;
        Channel::Buffer(Buffer {
            data: Vec::with_capacity(CHANNEL_BYTES),
            pos: 0,
        })
    }

    fn is_empty(&self) -> bool {
        match self {
            #[cfg(target_os = "linux")]
            Channel::Pipe(p) => p.len == 0,
            Channel::Buffer(b) => b.pos == b.data.len(),
        }
    }

    /// Reads from `src` into the (empty) channel; 0 means FIN.
    fn fill(&mut self, src: &TcpStream) -> io::Result<usize> {
        match self {
            #[cfg(target_os = "linux")]
            Channel::Pipe(p) => p.fill(src),
            Channel::Buffer(b) => {
                b.data.clear();
                b.pos = 0;
                src.try_read_buf(&mut b.data)
            }
        }
    }

    /// Writes from the channel to `dst`.
    fn drain(&mut self, dst: &TcpStream) -> io::Result<usize> {
        match self {
            #[cfg(target_os = "linux")]
            Channel::Pipe(p) => p.drain(dst),
            Channel::Buffer(b) => {
                let n = dst.try_write(&b.data[b.pos..])?;
                b.pos += n;
                Ok(n)
            }
        }
    }
}

struct Buffer {
    data: Vec<u8>,
    pos: usize,
}

#[cfg(target_os = "linux")]
mod splice {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use tokio::net::TcpStream;

    use super::CHANNEL_BYTES;

    /// A non-blocking pipe and how many bytes it holds.
    pub(super) struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
        pub(super) len: usize,
    }

    impl Pipe {
        pub(super) fn new() -> io::Result<Pipe> {
            let mut fds = [0; 2];
            // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
            let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
            let (read, write) =
                unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            Ok(Pipe {
                read,
                write,
                len: 0,
            })
        }

        /// socket → pipe. Returns 0 at FIN.
        pub(super) fn fill(&mut self, src: &TcpStream) -> io::Result<usize> {
            let n = splice(src.as_raw_fd(), self.write.as_raw_fd(), CHANNEL_BYTES)?;
            self.len += n;
            Ok(n)
        }

        /// pipe → socket.
        pub(super) fn drain(&mut self, dst: &TcpStream) -> io::Result<usize> {
            let n = splice(self.read.as_raw_fd(), dst.as_raw_fd(), self.len)?;
            if n == 0 {
                // Cannot happen with bytes in the pipe; do not spin if a kernel says so.
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "splice to socket moved nothing",
                ));
            }
            self.len -= n;
            Ok(n)
        }
    }

    fn splice(from: i32, to: i32, len: usize) -> io::Result<usize> {
        // SAFETY: both fds are open for the duration of the call (borrowed from live
        // objects); null offsets are valid for pipes and sockets; splice does not touch
        // user memory.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// Classifies the error that ended a leg.
fn classify(error: &io::Error, sock: &TcpStream) -> DisconnectReason {
    match error.raw_os_error() {
        // ENOTCONN: the socket was reset and the error already reported on another call.
        Some(libc::ECONNRESET | libc::EPIPE | libc::ECONNABORTED | libc::ENOTCONN) => {
            DisconnectReason::PeerReset
        }
        Some(libc::ETIMEDOUT) => {
            let (probes, retransmits) = timeout_counters(sock).unwrap_or((0, 0));
            classify_timeout(probes, retransmits)
        }
        _ => match error.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted => DisconnectReason::PeerReset,
            io::ErrorKind::TimedOut => DisconnectReason::KeepaliveTimeout,
            _ => DisconnectReason::Io(error.to_string()),
        },
    }
}

/// Tells a keepalive abort from a user-timeout abort after `ETIMEDOUT`, from the socket's
/// `TCP_INFO` counters, which survive the abort: `probes` (`tcpi_probes`, unanswered
/// keepalive or zero-window probes) and `retransmits` (`tcpi_retransmits`, retransmissions of
/// unacknowledged data). Data in flight stops keepalive probing, so retransmissions mean the
/// data timed out; otherwise (probes, or nothing known) it was keepalive.
pub fn classify_timeout(probes: u8, retransmits: u8) -> DisconnectReason {
    if retransmits > 0 && probes == 0 {
        DisconnectReason::UserTimeout
    } else {
        DisconnectReason::KeepaliveTimeout
    }
}

fn timeout_counters(sock: &TcpStream) -> Option<(u8, u8)> {
    crate::sockopt::tcp_info(sock).map(|i| (i.probes, i.retransmits))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_told_apart_by_counters() {
        assert_eq!(classify_timeout(3, 0), DisconnectReason::KeepaliveTimeout);
        assert_eq!(classify_timeout(0, 5), DisconnectReason::UserTimeout);
        assert_eq!(classify_timeout(0, 0), DisconnectReason::KeepaliveTimeout);
        assert_eq!(classify_timeout(1, 1), DisconnectReason::KeepaliveTimeout);
    }

    #[test]
    fn every_proxy_reason_is_a_disconnect_label() {
        for l in PROXY_REASONS {
            assert!(DisconnectReason::LABELS.contains(&l), "{l}");
        }
    }

    #[test]
    fn metrics_sum_over_legs() {
        let c = Counters::default();
        let end = |reason, leg| RelayEnd {
            reason,
            leg,
            first_fin: None,
            abortive: true,
            bytes_up: 0,
            bytes_down: 0,
            duration: Duration::ZERO,
        };
        c.record_end(&end(DisconnectReason::PeerReset, Some(Leg::Client)));
        c.record_end(&end(DisconnectReason::PeerReset, Some(Leg::Upstream)));
        c.record_end(&end(DisconnectReason::IdleTimeout, None));
        c.record_end(&end(DisconnectReason::Io("x".into()), Some(Leg::Client)));
        let m = c.snapshot();
        assert_eq!(m.closed_with("peer-reset"), 2);
        assert_eq!(m.closed_with("idle-timeout"), 1);
        assert_eq!(m.closed[2][4], 1);
        assert_eq!(m.closed_with("io-error"), 1);
        assert_eq!(m.closed_with("no-such-reason"), 0);
    }
}
