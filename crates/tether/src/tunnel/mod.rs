//! `tether tunnel`: carry an unmodified program's TCP connections across a path that breaks,
//! so that they survive outages shorter than the session linger without losing, duplicating
//! or reordering a byte, and are reset (RST) on both ends when the outage lasts longer.
//!
//! ```text
//!  app client ──TCP──▶ [entry] ══ tether session per app connection ══▶ [exit] ──TCP──▶ target
//!                       │  Client{id: tun-<hex>}        Server(sessions) │
//!                       │  app bytes → DATA messages    DATA → writes    │
//!                       │  writes ← DATA messages       reads → DATA     │
//! ```
//!
//! **One tether session per application connection.** Each accepted application connection
//! gets its own [`Client`](crate::Client) with a unique client id (`tun-` + 16 random hex digits); the exit
//! runs one [`Server`](crate::Server) with sessions and opens one target connection per id. This is the
//! simplest design that gives every guarantee per connection for free: the session's
//! exactly-once, in-order delivery is exactly TCP's byte-stream contract, a slow application
//! stalls only its own session (no head-of-line blocking between connections, no fair
//! scheduler to write), and losing one session fails exactly one application connection. The
//! cost is one TCP connection and one heartbeat stream per application connection, which is
//! right for the programs this is for (a few long-lived connections), and wrong for thousands
//! of short ones — multiplexing would suit those, at the price of a scheduler and per-stream
//! flow control inside one session.
//!
//! # Messages inside the session
//!
//! Every tether message carries one tunnel message, a kind byte and a body: OPEN, DATA, FIN,
//! ABORT, WINDOW, DONE. Their bytes are in the core, [`tether_proto::wire::tunnel`].
//!
//! # Where things are
//!
//! ```text
//!  entry.rs  TunnelEntry: accept, one Client per application connection, EntrySource
//!  exit.rs   TunnelExit: the Server, the router (OPEN, limit, path changes), target connect
//!  pump.rs   both directions of one connection with credit, and its ending (FIN or RST)
//!  link.rs   the tether side: Outbound (send a message), Source (what the peer sent)
//!  app.rs    the application side: the program's socket or the target connection
//! ```
//!
//! **Nothing waits for a timer.** OPEN is queued as soon as the application connects (it goes
//! out with the handshake, and the application's first bytes right behind it); the exit
//! connects to the target the moment OPEN arrives, and answers a target that refuses with
//! ABORT at once, which the entry turns into an RST. Waiting for room in a full session
//! backlog is by notification (the exit's router signals every path change).
//!
//! **Limits.** The exit holds at most [`ExitConfig::max_connections`] tunnelled connections;
//! an OPEN over the limit is answered with ABORT (the application gets an RST) and reported
//! as [`TunnelEvent::Rejected`], and no target connection is made for it.
//!
//! **Back-pressure end to end (credit).** Each direction starts with [`WINDOW`] bytes of
//! credit; a side reads from its application only as much as it has credit for, and the
//! receiver returns credit (WINDOW) only after it has written the bytes to its application.
//! So a slow reader at one end slows the writer at the other end through TCP's own flow
//! control, and a tunnel holds at most `WINDOW` bytes per direction in memory, whatever the
//! speed of either program or the state of the path. A peer that sends more than it was
//! granted, or grants more than was sent, breaks the protocol and the connection is reset.
//!
//! **Endings.** A half-close (EOF) travels as FIN and becomes `shutdown(Write)` on the other
//! side; the other direction keeps flowing. When both directions have finished, the exit
//! sends DONE and closes its target connection; the entry closes its session on DONE. A
//! failure of an application connection (RST, error) travels as ABORT and becomes an RST
//! (`SO_LINGER` 0) on the other side. If the path stays down longer than the linger (the
//! entry counts from the moment it notices the path down; the exit's server drops the held
//! session `session_linger` after it noticed), both ends reset their application connection.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tether_proto::backoff::BackoffConfig;
use tether_proto::session::SessionConfig;
use tether_proto::Policy;

use crate::credential::Credentials;
use crate::server::ServerConfig;
use crate::tls::TlsClient;

mod app;
mod entry;
mod exit;
mod link;
mod pump;
#[cfg(test)]
mod tests;

pub use entry::TunnelEntry;
pub use exit::TunnelExit;
/// Protocol version carried in OPEN.
pub use tether_proto::wire::tunnel::VERSION;

/// Credit each direction starts with, in bytes (the most a tunnel holds per direction).
///
/// Part of the protocol: both sides assume it (a peer sending more than this before its
/// first WINDOW breaks the protocol), so changing it needs a new OPEN version. 1 MiB is
/// enough on loopback: 4 MiB measured no faster in `benches/tunnel.rs` (issue 17).
pub const WINDOW: u32 = 1 << 20;
/// Largest DATA payload (one application read). 256 KiB: a quarter of the per-message costs
/// of 64 KiB (wake-ups, channel hops, frames) on a bulk stream, measured faster in
/// `benches/tunnel.rs`. The receiving side accepts any size the credit and the tether frame
/// limit (1 MiB) allow, so a peer with another chunk size interoperates. Each direction's
/// pump keeps one read buffer of this size once the stream has moved a byte, and while the
/// stream moves up to 6 more whose messages are in flight or just gone (reused instead of
/// allocated again; released after 250 ms without a byte from the application).
pub const CHUNK: usize = 256 * 1024;
/// After a failed `accept` (out of file descriptors), the longest wait before trying again
/// when none of our own connections ended meanwhile.
const ACCEPT_RETRY: Duration = Duration::from_millis(250);

/// How a tunnelled connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TunnelEnd {
    /// Both directions finished in order (FIN both ways); closed with FIN.
    Closed,
    /// This side's application connection failed (reset or error); the peer was told
    /// (ABORT) and resets its side.
    LocalReset(String),
    /// The other side's application connection failed, or the target was unreachable; this
    /// side's application connection was reset.
    PeerAborted(String),
    /// The session could not be resumed within the linger (or the relay was unreachable);
    /// this side's application connection was reset.
    PathLost(String),
    /// The peer broke the tunnel protocol; both application connections are reset.
    Protocol(String),
    /// The tunnel process shut down; both application connections are reset.
    Shutdown,
}

impl TunnelEnd {
    /// False only for [`TunnelEnd::Closed`]: the application connection was reset.
    pub fn is_failure(&self) -> bool {
        !matches!(self, TunnelEnd::Closed)
    }
}

impl std::fmt::Display for TunnelEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TunnelEnd::Closed => write!(f, "closed"),
            TunnelEnd::LocalReset(s) => write!(f, "local-reset ({s})"),
            TunnelEnd::PeerAborted(s) => write!(f, "peer-aborted ({s})"),
            TunnelEnd::PathLost(s) => write!(f, "path-lost ({s})"),
            TunnelEnd::Protocol(s) => write!(f, "protocol-error ({s})"),
            TunnelEnd::Shutdown => write!(f, "shutdown"),
        }
    }
}

/// What an entry or exit reports, per tunnelled connection (`id` is the tether client id).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TunnelEvent {
    /// A tunnelled connection started.
    Opened {
        /// Tunnel id.
        id: String,
        /// The application's address (entry) or the local address of the target
        /// connection (exit).
        app: SocketAddr,
    },
    /// The path broke; the session is held while it reconnects.
    PathDown {
        /// Tunnel id.
        id: String,
        /// Why the tether connection ended.
        reason: String,
    },
    /// The session resumed on a new connection; nothing was lost.
    PathUp {
        /// Tunnel id.
        id: String,
    },
    /// The exit was at its connection limit: the OPEN was answered with ABORT and no target
    /// connection was made (the entry reports `PeerAborted` for it).
    Rejected {
        /// Tunnel id.
        id: String,
        /// The limit ([`ExitConfig::max_connections`]).
        limit: usize,
    },
    /// A tunnelled connection ended. (At the exit, when the target could not be reached,
    /// no `Opened` precedes it.)
    Closed {
        /// Tunnel id.
        id: String,
        /// How.
        end: TunnelEnd,
        /// Bytes read from this side's application and sent.
        bytes_from_app: u64,
        /// Bytes received and written to this side's application.
        bytes_to_app: u64,
        /// Path outages ridden out (PathDown events).
        outages: u32,
        /// How long the connection lasted.
        duration: Duration,
    },
}

/// Settings of `tether tunnel entry`.
#[derive(Debug, Clone)]
pub struct EntryConfig {
    /// Where application connections are accepted.
    pub listen: SocketAddr,
    /// The exit (`tether tunnel exit --listen`).
    pub relay: SocketAddr,
    /// Liveness policy of the tether connections. Default: `Policy::default()`.
    pub policy: Policy,
    /// Longest outage ridden out: the entry resets the application connection when the
    /// session has not resumed this long after the path went down (the exit's own linger,
    /// learnt at connect, caps it), or when the relay cannot be reached this long at start.
    /// Default: 30 s.
    pub linger: Duration,
    /// Replay bounds of the sessions. Default: `SessionConfig::default()`.
    pub session: SessionConfig,
    /// Reconnect backoff. Default: 50 ms base, 1 s cap, retry until the linger runs out.
    pub backoff: BackoffConfig,
    /// Speak TLS to the exit. Default: none (plain TCP).
    pub tls: Option<TlsClient>,
    /// The credential presented to the exit (it must allow the ids `tun-*`, or the exit must
    /// accept any id of an authenticated entry, as `tether tunnel exit` does). Default: none.
    pub credential: Option<Credentials>,
}

impl EntryConfig {
    /// Defaults for accepting on `listen` and relaying to `relay`.
    pub fn new(listen: SocketAddr, relay: SocketAddr) -> Self {
        EntryConfig {
            listen,
            relay,
            policy: Policy::default(),
            linger: Duration::from_secs(30),
            session: SessionConfig::default(),
            backoff: BackoffConfig {
                base: Duration::from_millis(50),
                cap: Duration::from_secs(1),
                max_attempts: None,
            },
            tls: None,
            credential: None,
        }
    }
}

/// Settings of `tether tunnel exit`.
#[derive(Debug, Clone)]
pub struct ExitConfig {
    /// The tether server (listen address, policy, `session_linger`, session bounds).
    /// `session_linger` must be set; `outbox_bytes` is raised to hold a full window, and
    /// `max_frame_len` to carry a full [`CHUNK`].
    pub server: ServerConfig,
    /// Where each tunnelled connection goes.
    pub target: SocketAddr,
    /// Connecting to the target must succeed within this. Default: 10 s.
    pub connect_timeout: Duration,
    /// Tunnelled connections open at once (each holds a tether session and a target
    /// connection); an OPEN beyond it is answered with ABORT. At least 1. Default: 10,000.
    pub max_connections: usize,
}

impl ExitConfig {
    /// Defaults for accepting tunnels on `listen` and connecting them to `target`.
    pub fn new(listen: SocketAddr, target: SocketAddr) -> Self {
        ExitConfig {
            server: ServerConfig::new(listen),
            target,
            connect_timeout: Duration::from_secs(10),
            max_connections: 10_000,
        }
    }

    /// Sets the limit of tunnelled connections open at once (at least 1). Default: 10,000.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }
}

/// Why an entry or exit could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunnelError {
    /// Binding the listening socket failed.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The exit needs sessions (`session_linger` is `None`).
    #[error("the tunnel exit needs sessions: set a session linger")]
    NoSessions,
}

/// `tun-` and 16 random hex digits.
fn tunnel_id() -> String {
    let mut b = [0u8; 8];
    if getrandom::getrandom(&mut b).is_err() {
        // Unique within the process is enough for an id (it is not a secret: the session's
        // resume token is).
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        b = (t ^ NEXT.fetch_add(1, Relaxed).rotate_left(48)).to_be_bytes();
    }
    let mut s = String::from("tun-");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}
