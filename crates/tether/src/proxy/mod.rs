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
//!   ([`DisconnectReason`](tether_proto::DisconnectReason)) and the other leg is closed:
//!
//!   | cause on one leg                                 | reason              | other leg gets |
//!   |--------------------------------------------------|---------------------|----------------|
//!   | FIN (orderly close, possibly a half-close)       | —                   | FIN (`shutdown(Write)`), the other direction keeps flowing |
//!   | both directions closed by FIN                    | `peer-closed`       | — (both already got their FIN) |
//!   | RST, `EPIPE`, `ECONNABORTED`                     | `peer-reset`        | RST            |
//!   | `ETIMEDOUT` after unanswered keepalive probes    | `keepalive-timeout` | RST            |
//!   | `ETIMEDOUT` with data unacknowledged             | `user-timeout`      | RST            |
//!   | no byte either way for `idle_timeout`            | `idle-timeout`      | RST (both legs)|
//!   | half-closed, no byte for `half_close_timeout`    | `half-close-timeout`| RST (both legs)|
//!   | any other socket error                           | `io-error`          | RST            |
//!
//!   RST is `SO_LINGER` 0 then close ([`sockopt::set_abortive_close`]): the program behind the
//!   other leg gets `ECONNRESET` on its next call instead of waiting, and no kernel keeps
//!   retransmitting into a dead path.
//! - **Half-closes are forwarded**: a FIN from one side becomes `shutdown(Write)` towards the
//!   other, and the opposite direction keeps flowing until it closes too (request/response
//!   programs that `shutdown(SHUT_WR)` after the request keep working) — but not forever:
//!   once half-closed, a connection whose open direction moves no byte for
//!   [`ProxyConfig::half_close_timeout`] (60 s by default) is reset on both legs, so a peer
//!   that never closes its half cannot pile up sockets.
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
//! # Where things are
//!
//! ```text
//!  mod.rs      Proxy: config, accept loop, connection limit, upstream connect, events
//!  relay.rs    relay(): both legs of one connection, error watches, idle and half-close
//!              timers, how it ended (classify)
//!  copy.rs     one direction's bytes: splice through a pipe or a buffer, released when idle
//!  metrics.rs  counters and their snapshot
//! ```
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

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tether_proto::Policy;
use thiserror::Error;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;

use crate::sockopt;

mod copy;
mod metrics;
mod relay;

pub use copy::{CopyMode, CHANNEL_BYTES, CHANNEL_RELEASE_AFTER};
pub use metrics::{ProxyHandle, ProxyMetrics, PROXY_REASONS};
pub use relay::{classify_timeout, relay, RelayEnd, RelayOptions};

use metrics::{Counters, OpenGuard};
use relay::relay_counted;

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
    /// Once one side has half-closed, the other direction moving nothing for this long
    /// resets both legs (`half-close-timeout`); `None` holds half-closed connections for as
    /// long as the other side keeps its half open. Default: 60 s.
    pub half_close_timeout: Option<Duration>,
}

/// After a failed `accept`, the longest wait before trying again when none of our
/// connections ended meanwhile.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Default of [`ProxyConfig::half_close_timeout`].
pub const DEFAULT_HALF_CLOSE_TIMEOUT: Duration = Duration::from_secs(60);

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
            half_close_timeout: Some(DEFAULT_HALF_CLOSE_TIMEOUT),
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
    /// Sets the half-close timeout (`None` disables it). Default: 60 s.
    pub fn half_close_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.half_close_timeout = timeout;
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
    /// `accept` failed (for example out of file descriptors); retried as soon as a relayed
    /// connection ends, or after 100 ms.
    AcceptFailed {
        /// The error.
        error: io::Error,
    },
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
                            // Out of file descriptors, typically: try again as soon as one of
                            // our connections ends (or after a while, for descriptors freed
                            // elsewhere), never in a spin.
                            let retry = tokio::time::sleep(ACCEPT_RETRY);
                            tokio::select! {
                                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                                _ = retry => {}
                            }
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
        half_close_timeout: cfg.half_close_timeout,
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
