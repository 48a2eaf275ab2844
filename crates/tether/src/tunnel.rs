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
//! gets its own [`Client`] with a unique client id (`tun-` + 16 random hex digits); the exit
//! runs one [`Server`] with sessions and opens one target connection per id. This is the
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
//! Every tether message carries one tunnel message: a kind byte, then a body.
//!
//! ```text
//!  kind  name    direction     body
//!  0x01  OPEN    entry → exit  u8 version (1): open a connection to the target
//!  0x02  DATA    both          1.. bytes of the application stream (one read, ≤ 64 KiB)
//!  0x03  FIN     both          —  the sender's application half-closed: no more DATA
//!  0x04  ABORT   both          UTF-8 reason: the sender's application connection failed
//!                              (reset, error, target unreachable): reset yours
//!  0x05  WINDOW  both          u32 BE n: I wrote n more of your bytes to my application
//!  0x06  DONE    exit → entry  —  both directions finished; the entry closes the session
//! ```
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

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tether_proto::backoff::BackoffConfig;
use tether_proto::session::SessionConfig;
use tether_proto::Policy;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

use crate::client::{Client, ClientConfig, ClientEvent, ClientSender};
use crate::credential::Credentials;
use crate::server::{SendError, Server, ServerConfig, ServerEvent, ServerHandle};
use crate::sockopt;
use crate::tls::TlsClient;

/// Protocol version carried in OPEN.
pub const VERSION: u8 = 1;
/// Credit each direction starts with, in bytes (the most a tunnel holds per direction).
pub const WINDOW: u32 = 1 << 20;
/// Largest DATA payload (one application read).
pub const CHUNK: usize = 64 * 1024;

const OPEN: u8 = 0x01;
const DATA: u8 = 0x02;
const FIN: u8 = 0x03;
const ABORT: u8 = 0x04;
const WINDOW_KIND: u8 = 0x05;
const DONE: u8 = 0x06;

/// Return credit once this much was written (fewer, larger WINDOW messages).
const GRANT_EVERY: u64 = WINDOW as u64 / 4;
/// How long a closing tunnel waits for its last messages to be queued or flushed.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// One decoded tunnel message.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Msg {
    Open(u8),
    Data(Bytes),
    Fin,
    Abort(String),
    Window(u32),
    Done,
}

fn decode(m: &Bytes) -> Result<Msg, String> {
    let Some(&kind) = m.first() else {
        return Err("empty tunnel message".into());
    };
    let body = m.slice(1..);
    let exact = |n: usize| {
        if body.len() == n {
            Ok(())
        } else {
            Err(format!(
                "tunnel message {kind:#04x} has {} body bytes, expected {n}",
                body.len()
            ))
        }
    };
    match kind {
        OPEN => exact(1).map(|()| Msg::Open(body[0])),
        DATA if body.is_empty() => Err("empty DATA".into()),
        DATA => Ok(Msg::Data(body)),
        FIN => exact(0).map(|()| Msg::Fin),
        ABORT => Ok(Msg::Abort(String::from_utf8_lossy(&body).into_owned())),
        WINDOW_KIND => {
            exact(4).map(|()| Msg::Window(u32::from_be_bytes([body[0], body[1], body[2], body[3]])))
        }
        DONE => exact(0).map(|()| Msg::Done),
        k => Err(format!("unknown tunnel message kind {k:#04x}")),
    }
}

fn encode(kind: u8, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(1 + body.len());
    b.put_u8(kind);
    b.put_slice(body);
    b.freeze()
}

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
    /// `session_linger` must be set; `outbox_bytes` is raised to hold a full window.
    pub server: ServerConfig,
    /// Where each tunnelled connection goes.
    pub target: SocketAddr,
    /// Connecting to the target must succeed within this. Default: 10 s.
    pub connect_timeout: Duration,
}

impl ExitConfig {
    /// Defaults for accepting tunnels on `listen` and connecting them to `target`.
    pub fn new(listen: SocketAddr, target: SocketAddr) -> Self {
        ExitConfig {
            server: ServerConfig::new(listen),
            target,
            connect_timeout: Duration::from_secs(10),
        }
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

/// A running `tether tunnel entry`. Dropping it shuts it down (every tunnelled connection is
/// reset).
pub struct TunnelEntry {
    local_addr: SocketAddr,
    events: mpsc::UnboundedReceiver<TunnelEvent>,
    stop: watch::Sender<bool>,
}

impl TunnelEntry {
    /// Binds `cfg.listen` and starts accepting application connections.
    pub async fn bind(cfg: EntryConfig) -> Result<TunnelEntry, TunnelError> {
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| TunnelError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let local_addr = listener.local_addr().unwrap_or(cfg.listen);
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(entry_accept(listener, Arc::new(cfg), tx, stop_rx));
        Ok(TunnelEntry {
            local_addr,
            events: rx,
            stop,
        })
    }

    /// Where application connections are accepted.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The next event; `None` after shutdown, once every tunnelled connection ended.
    pub async fn next_event(&mut self) -> Option<TunnelEvent> {
        self.events.recv().await
    }

    /// Stops accepting and resets every tunnelled connection (telling the exit).
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for TunnelEntry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A running `tether tunnel exit`. Dropping it shuts it down (every tunnelled connection is
/// reset).
pub struct TunnelExit {
    local_addr: SocketAddr,
    server: ServerHandle,
    events: mpsc::UnboundedReceiver<TunnelEvent>,
    stop: watch::Sender<bool>,
}

impl TunnelExit {
    /// Starts the tether server on `cfg.server.listen`.
    pub async fn bind(mut cfg: ExitConfig) -> Result<TunnelExit, TunnelError> {
        if cfg.server.session_linger.is_none() {
            return Err(TunnelError::NoSessions);
        }
        // Room for a full window of DATA plus WINDOW/FIN/DONE messages while resuming.
        cfg.server.outbox_bytes = cfg.server.outbox_bytes.max(2 * WINDOW as usize);
        let addr = cfg.server.listen;
        let server = Server::bind(cfg.server.clone())
            .await
            .map_err(|source| TunnelError::Bind { addr, source })?;
        let local_addr = server.local_addr();
        let handle = server.handle();
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(exit_route(server, Arc::new(cfg), tx, stop_rx));
        Ok(TunnelExit {
            local_addr,
            server: handle,
            events: rx,
            stop,
        })
    }

    /// Where tether connections from entries are accepted.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The tether server (presence, metrics).
    pub fn server(&self) -> &ServerHandle {
        &self.server
    }

    /// The next event; `None` after shutdown.
    pub async fn next_event(&mut self) -> Option<TunnelEvent> {
        self.events.recv().await
    }

    /// Stops accepting and resets every tunnelled connection (telling the entries).
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for TunnelExit {
    fn drop(&mut self) {
        self.shutdown();
    }
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

// ---------------------------------------------------------------------------------------------
// The sending half towards the peer.

enum Out {
    Client(ClientSender),
    Server(ServerHandle, String),
}

impl Out {
    /// Sends one tunnel message; `Err` when the session is gone.
    async fn send(&self, m: Bytes) -> Result<(), String> {
        match self {
            Out::Client(c) => c.send(m).await.map_err(|e| e.to_string()),
            Out::Server(h, id) => loop {
                match h.send(id, m.clone()).await {
                    Ok(()) => return Ok(()),
                    // Resuming with a full backlog: the credit bounds it, so this is brief.
                    Err(SendError::Backlogged(_)) => {
                        tokio::time::sleep(Duration::from_millis(5)).await
                    }
                    Err(e) => return Err(e.to_string()),
                }
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The application socket, shared by the reading and the writing half of one task (no split
// halves: an owned write half sends FIN when dropped, which must not happen before an RST).

async fn read_some(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        s.readable().await?;
        match s.try_read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

async fn write_all(s: &TcpStream, mut b: &[u8]) -> io::Result<()> {
    while !b.is_empty() {
        s.writable().await?;
        match s.try_write(b) {
            Ok(n) => b = &b[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn shutdown_write(s: &TcpStream) -> io::Result<()> {
    socket2::SockRef::from(s).shutdown(std::net::Shutdown::Write)
}

/// Counters of one tunnelled connection.
#[derive(Default)]
struct Counters {
    from_app: AtomicU64,
    to_app: AtomicU64,
    /// Credit the peer granted us (WINDOW), on top of the initial window.
    granted_to_us: AtomicU64,
    /// Credit we granted the peer (WINDOW sent), on top of the initial window.
    granted_by_us: AtomicU64,
}

/// Application → peer: read only what the credit allows, one DATA message per read; FIN at EOF.
async fn app_to_peer(
    app: &TcpStream,
    credit: &Semaphore,
    out: &Out,
    n: &Counters,
) -> Result<(), TunnelEnd> {
    // One reusable read buffer; each message is copied out at its exact size, so a stream of
    // small reads does not pin a chunk-sized allocation per queued message.
    let mut buf = vec![0u8; 1 + CHUNK];
    buf[0] = DATA;
    loop {
        // Wait for at least one byte of credit, then take what is there (up to a chunk).
        // This future is the only consumer of the semaphore.
        match credit.acquire().await {
            Ok(p) => p.forget(),
            Err(_) => return Err(TunnelEnd::Shutdown),
        }
        let mut allowed = 1;
        let extra = credit.available_permits().min(CHUNK - 1);
        if extra > 0 {
            if let Ok(p) = credit.try_acquire_many(extra as u32) {
                p.forget();
                allowed += extra;
            }
        }
        // Exactly the credit's worth of room: a read can never take more than was granted.
        let read = match read_some(app, &mut buf[1..1 + allowed]).await {
            Ok(r) => r,
            Err(e) => return Err(TunnelEnd::LocalReset(format!("read: {e}"))),
        };
        if read < allowed {
            credit.add_permits(allowed - read);
        }
        if read == 0 {
            out.send(encode(FIN, &[]))
                .await
                .map_err(TunnelEnd::PathLost)?;
            return Ok(());
        }
        n.from_app.fetch_add(read as u64, Relaxed);
        out.send(Bytes::copy_from_slice(&buf[..1 + read]))
            .await
            .map_err(TunnelEnd::PathLost)?;
    }
}

enum ToApp {
    Data(Bytes),
    Fin,
}

/// Peer → application: write DATA, return credit after writing; FIN → shutdown(Write).
async fn peer_to_app(
    app: &TcpStream,
    rx: &mut mpsc::UnboundedReceiver<ToApp>,
    out: &Out,
    n: &Counters,
) -> Result<(), TunnelEnd> {
    let mut ungranted: u64 = 0;
    loop {
        match rx.recv().await {
            Some(ToApp::Data(d)) => {
                write_all(app, &d)
                    .await
                    .map_err(|e| TunnelEnd::LocalReset(format!("write: {e}")))?;
                n.to_app.fetch_add(d.len() as u64, Relaxed);
                ungranted += d.len() as u64;
                if ungranted >= GRANT_EVERY {
                    n.granted_by_us.fetch_add(ungranted, Relaxed);
                    let g = ungranted as u32;
                    ungranted = 0;
                    out.send(encode(WINDOW_KIND, &g.to_be_bytes()))
                        .await
                        .map_err(TunnelEnd::PathLost)?;
                }
            }
            Some(ToApp::Fin) => {
                shutdown_write(app).map_err(|e| TunnelEnd::LocalReset(format!("shutdown: {e}")))?;
                return Ok(());
            }
            None => return Err(TunnelEnd::Shutdown),
        }
    }
}

/// What the event source of a tunnel (client events at the entry, the router at the exit)
/// delivers.
enum Inbound {
    Msg(Bytes),
    PathDown(String),
    PathUp,
    End(TunnelEnd),
}

trait Source {
    /// The next inbound item; must be cancel-safe.
    async fn next(&mut self) -> Inbound;
}

/// Entry side: the tunnel's own client, and the linger deadline while the path is down.
struct EntrySource {
    client: Client,
    cap: Duration,
    linger: Duration,
    connected: bool,
    started: Instant,
    down_since: Option<Instant>,
}

impl Source for EntrySource {
    async fn next(&mut self) -> Inbound {
        loop {
            let deadline = match (self.connected, self.down_since) {
                (false, _) => Some(self.started + self.cap),
                (true, Some(t)) => Some(t + self.linger),
                (true, None) => None,
            };
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ev = self.client.next_event() => match ev {
                    None => return Inbound::End(TunnelEnd::PathLost("tether client stopped".into())),
                    Some(ClientEvent::Connected { welcome }) => {
                        if !self.connected {
                            let Some(grant) = welcome.session else {
                                return Inbound::End(TunnelEnd::Protocol(
                                    "the relay does not grant sessions".into(),
                                ));
                            };
                            self.linger = self.cap.min(grant.linger);
                            self.connected = true;
                        }
                    }
                    Some(ClientEvent::Resumed { .. }) => {
                        if self.down_since.take().is_some() {
                            return Inbound::PathUp;
                        }
                    }
                    Some(ClientEvent::SessionLost { .. }) => {
                        return Inbound::End(TunnelEnd::PathLost(
                            "the relay no longer holds the session".into(),
                        ))
                    }
                    Some(ClientEvent::Message(m)) => return Inbound::Msg(m),
                    Some(ClientEvent::Disconnected { disconnect }) => {
                        if self.connected && self.down_since.is_none() {
                            self.down_since = Some(Instant::now());
                            return Inbound::PathDown(disconnect.reason.to_string());
                        }
                    }
                    Some(ClientEvent::GaveUp { reason, .. }) => {
                        return Inbound::End(TunnelEnd::PathLost(format!("gave up: {reason}")))
                    }
                    Some(_) => {}
                },
                _ = sleep => {
                    let why = if self.connected {
                        format!("path down longer than the linger ({:?})", self.linger)
                    } else {
                        format!("relay unreachable for {:?}", self.cap)
                    };
                    return Inbound::End(TunnelEnd::PathLost(why));
                }
            }
        }
    }
}

/// Exit side: what the router forwards for this id.
struct ExitSource {
    rx: mpsc::UnboundedReceiver<Inbound>,
}

impl Source for ExitSource {
    async fn next(&mut self) -> Inbound {
        self.rx
            .recv()
            .await
            .unwrap_or(Inbound::End(TunnelEnd::Shutdown))
    }
}

/// Result of [`pump`]: how it ended, and the outages seen.
struct Pumped {
    end: TunnelEnd,
    outages: u32,
}

/// Who is pumping: the tunnel id, which side (the entry's completion needs DONE), its
/// counters and where its events go.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    id: &'a str,
    is_entry: bool,
    n: &'a Counters,
    events: &'a mpsc::UnboundedSender<TunnelEvent>,
}

/// Moves bytes both ways until the connection ends.
async fn pump<S: Source>(
    app: &TcpStream,
    out: &Out,
    src: &mut S,
    ctx: Ctx<'_>,
    stop: &mut watch::Receiver<bool>,
) -> Pumped {
    let Ctx {
        id,
        is_entry,
        n,
        events,
    } = ctx;
    let credit = Semaphore::new(WINDOW as usize);
    let (to_app, mut to_app_rx) = mpsc::unbounded_channel();
    let reader = app_to_peer(app, &credit, out, n);
    let writer = peer_to_app(app, &mut to_app_rx, out, n);
    tokio::pin!(reader, writer);
    let (mut reader_done, mut writer_done, mut done_seen, mut fin_seen) =
        (false, false, false, false);
    let mut received: u64 = 0;
    let mut outages = 0;
    let end = loop {
        if reader_done && writer_done && (done_seen || !is_entry) {
            break TunnelEnd::Closed;
        }
        if *stop.borrow() {
            break TunnelEnd::Shutdown;
        }
        tokio::select! {
            r = &mut reader, if !reader_done => match r {
                Ok(()) => reader_done = true,
                Err(e) => break e,
            },
            w = &mut writer, if !writer_done => match w {
                Ok(()) => writer_done = true,
                Err(e) => break e,
            },
            _ = stop.changed() => break TunnelEnd::Shutdown,
            inbound = src.next() => match inbound {
                Inbound::End(e) => break e,
                Inbound::PathDown(reason) => {
                    outages += 1;
                    let _ = events.send(TunnelEvent::PathDown { id: id.to_owned(), reason });
                }
                Inbound::PathUp => {
                    let _ = events.send(TunnelEvent::PathUp { id: id.to_owned() });
                }
                Inbound::Msg(m) => match decode(&m) {
                    Err(e) => break TunnelEnd::Protocol(e),
                    Ok(Msg::Data(d)) => {
                        received += d.len() as u64;
                        let allowed = u64::from(WINDOW) + n.granted_by_us.load(Relaxed);
                        if fin_seen {
                            break TunnelEnd::Protocol("DATA after FIN".into());
                        }
                        if received > allowed {
                            break TunnelEnd::Protocol(format!(
                                "peer sent {received} bytes with credit for {allowed}"
                            ));
                        }
                        let _ = to_app.send(ToApp::Data(d));
                    }
                    Ok(Msg::Fin) => {
                        if fin_seen {
                            break TunnelEnd::Protocol("second FIN".into());
                        }
                        fin_seen = true;
                        let _ = to_app.send(ToApp::Fin);
                    }
                    Ok(Msg::Window(g)) => {
                        let total = n.granted_to_us.fetch_add(u64::from(g), Relaxed) + u64::from(g);
                        if total > n.from_app.load(Relaxed) {
                            break TunnelEnd::Protocol(format!(
                                "peer granted credit for {total} bytes, only {} sent",
                                n.from_app.load(Relaxed)
                            ));
                        }
                        credit.add_permits(g as usize);
                    }
                    Ok(Msg::Abort(reason)) => break TunnelEnd::PeerAborted(reason),
                    Ok(Msg::Done) if is_entry => {
                        if !fin_seen {
                            break TunnelEnd::Protocol("DONE before FIN".into());
                        }
                        done_seen = true;
                    }
                    Ok(Msg::Done) => break TunnelEnd::Protocol("DONE sent to the exit".into()),
                    Ok(Msg::Open(_)) => break TunnelEnd::Protocol("OPEN on an open tunnel".into()),
                },
            },
        }
    };
    Pumped { end, outages }
}

/// After [`pump`]: tell the peer what it must know, and close the application connection
/// with FIN (orderly) or RST (any failure).
async fn finish(app: TcpStream, out: &Out, end: &TunnelEnd, is_entry: bool) {
    let tell = match end {
        TunnelEnd::Closed if !is_entry => Some(encode(DONE, &[])),
        TunnelEnd::Closed => None,
        TunnelEnd::LocalReset(s) => Some(encode(ABORT, s.as_bytes())),
        TunnelEnd::Protocol(s) => Some(encode(ABORT, format!("protocol error: {s}").as_bytes())),
        TunnelEnd::Shutdown => Some(encode(ABORT, b"tunnel shutting down")),
        TunnelEnd::PeerAborted(_) | TunnelEnd::PathLost(_) => None,
    };
    if end.is_failure() {
        let _ = sockopt::set_abortive_close(&app);
    }
    drop(app);
    if let Some(m) = tell {
        let _ = tokio::time::timeout(FLUSH_WAIT, out.send(m)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Entry.

async fn entry_accept(
    listener: TcpListener,
    cfg: Arc<EntryConfig>,
    events: mpsc::UnboundedSender<TunnelEvent>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((app, peer)) => {
                    tokio::spawn(entry_conn(app, peer, cfg.clone(), events.clone(), stop.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => return,
        }
    }
}

async fn entry_conn(
    app: TcpStream,
    peer: SocketAddr,
    cfg: Arc<EntryConfig>,
    events: mpsc::UnboundedSender<TunnelEvent>,
    mut stop: watch::Receiver<bool>,
) {
    let started = Instant::now();
    let id = tunnel_id();
    let _ = app.set_nodelay(true);
    let mut ccfg = ClientConfig::new(cfg.relay, id.clone());
    ccfg.connect.policy = cfg.policy.clone();
    // A reconnect attempt whose handshake was swallowed by the outage must not outlive the
    // outage by much: give up on it after the detection bound and try again.
    ccfg.connect.handshake_timeout = ccfg
        .connect
        .handshake_timeout
        .min(cfg.policy.dead_after)
        .max(Duration::from_millis(500));
    ccfg.backoff = cfg.backoff;
    ccfg.session_config = cfg.session;
    ccfg.outbox_bytes = 2 * WINDOW as usize;
    ccfg.connect.tls = cfg.tls.clone();
    ccfg.connect.credential = cfg.credential.clone();
    let client = Client::start(ccfg);
    let out = Out::Client(client.sender());
    let _ = events.send(TunnelEvent::Opened {
        id: id.clone(),
        app: peer,
    });
    let mut src = EntrySource {
        client,
        cap: cfg.linger,
        linger: cfg.linger,
        connected: false,
        started,
        down_since: None,
    };
    let n = Counters::default();
    let pumped = match out.send(encode(OPEN, &[VERSION])).await {
        Ok(()) => {
            pump(
                &app,
                &out,
                &mut src,
                Ctx {
                    id: &id,
                    is_entry: true,
                    n: &n,
                    events: &events,
                },
                &mut stop,
            )
            .await
        }
        Err(e) => Pumped {
            end: TunnelEnd::PathLost(e),
            outages: 0,
        },
    };
    finish(app, &out, &pumped.end, true).await;
    // Orderly endings flush what is queued (DONE was received, or our ABORT must arrive);
    // the others have nothing left to say.
    match pumped.end {
        TunnelEnd::PeerAborted(_) | TunnelEnd::PathLost(_) => src.client.close(),
        _ => src.client.shutdown(FLUSH_WAIT).await,
    }
    let _ = events.send(TunnelEvent::Closed {
        id,
        end: pumped.end,
        bytes_from_app: n.from_app.load(Relaxed),
        bytes_to_app: n.to_app.load(Relaxed),
        outages: pumped.outages,
        duration: started.elapsed(),
    });
}

// ---------------------------------------------------------------------------------------------
// Exit.

async fn exit_route(
    mut server: Server,
    cfg: Arc<ExitConfig>,
    events: mpsc::UnboundedSender<TunnelEvent>,
    mut stop: watch::Receiver<bool>,
) {
    let handle = server.handle();
    let mut live: HashMap<String, mpsc::UnboundedSender<Inbound>> = HashMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
    loop {
        tokio::select! {
            ev = server.next_event() => match ev {
                None => break,
                Some(ServerEvent::Message { client_id, msg, .. }) => {
                    if let Some(tx) = live.get(&client_id) {
                        let _ = tx.send(Inbound::Msg(msg));
                        continue;
                    }
                    match decode(&msg) {
                        Ok(Msg::Open(v)) if v == VERSION => {
                            let (tx, rx) = mpsc::unbounded_channel();
                            live.insert(client_id.clone(), tx);
                            tokio::spawn(exit_conn(
                                client_id,
                                handle.clone(),
                                cfg.clone(),
                                ExitSource { rx },
                                events.clone(),
                                stop.clone(),
                                done_tx.clone(),
                            ));
                        }
                        Ok(Msg::Open(v)) => {
                            let h = handle.clone();
                            tokio::spawn(async move {
                                let why = format!("unsupported tunnel version {v} (this exit speaks {VERSION})");
                                let out = Out::Server(h, client_id);
                                let _ = tokio::time::timeout(FLUSH_WAIT, out.send(encode(ABORT, why.as_bytes()))).await;
                            });
                        }
                        // A late message of a tunnel that already ended: nothing to do.
                        _ => tracing::debug!(client = %client_id, "message for no open tunnel"),
                    }
                }
                Some(ServerEvent::Disconnected { client_id, disconnect, .. }) => {
                    if let Some(tx) = live.get(&client_id) {
                        let _ = tx.send(Inbound::PathDown(disconnect.reason.to_string()));
                    }
                }
                Some(ServerEvent::Resumed { client_id, .. }) => {
                    if let Some(tx) = live.get(&client_id) {
                        let _ = tx.send(Inbound::PathUp);
                    }
                }
                Some(ServerEvent::SessionLost { client_id, .. }) => {
                    if let Some(tx) = live.remove(&client_id) {
                        let _ = tx.send(Inbound::End(TunnelEnd::PathLost(
                            "session not resumed within the linger".into(),
                        )));
                    }
                }
                Some(_) => {}
            },
            Some(id) = done_rx.recv() => {
                live.remove(&id);
            }
            _ = stop.changed() => break,
        }
    }
    // Shutting down: the tunnels see the stop signal themselves; give them time to tell
    // their entries (ABORT), then close the tether connections.
    let mut pending = live.len();
    drop(live);
    let _ = tokio::time::timeout(FLUSH_WAIT, async {
        while pending > 0 && done_rx.recv().await.is_some() {
            pending -= 1;
        }
    })
    .await;
    handle.shutdown(FLUSH_WAIT).await;
}

async fn exit_conn(
    id: String,
    handle: ServerHandle,
    cfg: Arc<ExitConfig>,
    mut src: ExitSource,
    events: mpsc::UnboundedSender<TunnelEvent>,
    mut stop: watch::Receiver<bool>,
    done: mpsc::UnboundedSender<String>,
) {
    let started = Instant::now();
    let out = Out::Server(handle, id.clone());
    let n = Counters::default();
    let connected = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(cfg.target)).await;
    let pumped = match connected {
        Ok(Ok(app)) => {
            let _ = app.set_nodelay(true);
            let _ = events.send(TunnelEvent::Opened {
                id: id.clone(),
                app: app.local_addr().unwrap_or(cfg.target),
            });
            let p = pump(
                &app,
                &out,
                &mut src,
                Ctx {
                    id: &id,
                    is_entry: false,
                    n: &n,
                    events: &events,
                },
                &mut stop,
            )
            .await;
            finish(app, &out, &p.end, false).await;
            p
        }
        Ok(Err(e)) => {
            let why = format!("cannot connect to the target {}: {e}", cfg.target);
            let _ = tokio::time::timeout(FLUSH_WAIT, out.send(encode(ABORT, why.as_bytes()))).await;
            Pumped {
                end: TunnelEnd::LocalReset(why),
                outages: 0,
            }
        }
        Err(_) => {
            let why = format!("connecting to the target {} timed out", cfg.target);
            let _ = tokio::time::timeout(FLUSH_WAIT, out.send(encode(ABORT, why.as_bytes()))).await;
            Pumped {
                end: TunnelEnd::LocalReset(why),
                outages: 0,
            }
        }
    };
    let _ = done.send(id.clone());
    let _ = events.send(TunnelEvent::Closed {
        id,
        end: pumped.end,
        bytes_from_app: n.from_app.load(Relaxed),
        bytes_to_app: n.to_app.load(Relaxed),
        outages: pumped.outages,
        duration: started.elapsed(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_an_error() {
        assert_eq!(decode(&encode(OPEN, &[1])), Ok(Msg::Open(1)));
        assert_eq!(
            decode(&encode(DATA, b"abc")),
            Ok(Msg::Data(Bytes::from_static(b"abc")))
        );
        assert_eq!(decode(&encode(FIN, &[])), Ok(Msg::Fin));
        assert_eq!(
            decode(&encode(ABORT, b"reset")),
            Ok(Msg::Abort("reset".into()))
        );
        assert_eq!(
            decode(&encode(WINDOW_KIND, &7u32.to_be_bytes())),
            Ok(Msg::Window(7))
        );
        assert_eq!(decode(&encode(DONE, &[])), Ok(Msg::Done));
        assert!(decode(&Bytes::new()).is_err());
        assert!(decode(&encode(DATA, &[])).is_err());
        assert!(decode(&encode(FIN, b"x")).is_err());
        assert!(decode(&encode(WINDOW_KIND, &[1, 2])).is_err());
        assert!(decode(&encode(OPEN, &[])).is_err());
        assert!(decode(&encode(0x7f, &[])).is_err());
    }

    #[test]
    fn ids_are_distinct() {
        let a = tunnel_id();
        let b = tunnel_id();
        assert!(a.starts_with("tun-") && a.len() == 20, "{a}");
        assert_ne!(a, b);
    }
}
