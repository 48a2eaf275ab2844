//! The bench's child processes (`tether bench agent ...`, hidden): a tether server, and load
//! generators holding tether or MQTT clients. The per-process open-file limit (20,000 here)
//! caps what one process can hold, so the server and the clients live in different processes.
//!
//! They talk to the coordinator in JSON lines: commands on stdin, events on stdout.
//!
//! ```text
//!  coordinator ──stdin: metrics | quit──────────▶ agent server (tether Server)
//!              ◀─stdout: listening, metrics, suspect, offline, lagged
//!  coordinator ──stdin: go | silence M | load K S | unload | stats | quit──▶ agent clients ×k
//!              ◀─stdout: ready, progress, connected, silenced, loading, unloaded, stats
//! ```

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use serde_json::json;
use tether::{ConnectOptions, Connection, Policy, Server, ServerConfig, Transport};
use tether_proto::presence::PresenceState;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::broadcast::error::RecvError;

use super::sys::{instant_ns, mono_ns};

/// The hidden agent roles.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum AgentCmd {
    /// A tether server reporting presence changes and metrics.
    Server(ServerAgentArgs),
    /// A load generator holding a share of the clients.
    Clients(ClientAgentArgs),
    /// Reconnecting tether clients (with sessions) that time what they receive (bench api).
    ApiClients(ApiClientArgs),
}

/// `api-clients` settings.
#[derive(clap::Args, Debug)]
pub(crate) struct ApiClientArgs {
    /// Server address.
    #[arg(long)]
    pub(crate) addr: SocketAddr,
    /// Source addresses of the client sockets: `127.B.0.0` spreads them over `127.B.x.y`,
    /// 250 clients per address.
    #[arg(long)]
    pub(crate) src: IpAddr,
    /// Global index of the first client (ids are `c<index>`).
    #[arg(long)]
    pub(crate) first: usize,
    /// How many clients.
    #[arg(long)]
    pub(crate) count: usize,
}

/// Server agent settings.
#[derive(clap::Args, Debug)]
pub(crate) struct ServerAgentArgs {
    /// The address to listen on (port chosen by the kernel): loopback, or the root end of
    /// the clients' veth (`bench hold --clients-over veth`).
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) listen: IpAddr,
    /// The detection bound of the policy, in milliseconds.
    #[arg(long)]
    pub(crate) detect_within_ms: u64,
    /// Heartbeat interval in milliseconds (derived from the bound when absent).
    #[arg(long)]
    pub(crate) heartbeat_ms: Option<u64>,
    /// Speak TLS with the test certificate in this directory (`tether_lab::test_tls`).
    #[arg(long)]
    pub(crate) tls_dir: Option<std::path::PathBuf>,
    /// Lot threads (`ServerConfig::park_threads`; default: one per worker). Also read from
    /// `TETHER_PARK_THREADS`, as `tether serve` does, so every bench's server can be run with
    /// one (`bench detect` has no flag of its own).
    #[arg(long, env = "TETHER_PARK_THREADS", value_parser = crate::cmd::serve::parse_park_threads)]
    pub(crate) park_threads: Option<usize>,
}

/// Which protocol the load generator speaks.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// tether clients (`Connection` over a transport that can be blackholed).
    Tether,
    /// Minimal MQTT 3.1.1 clients (CONNECT, then PINGREQ every keepalive).
    Mqtt,
}

/// Client agent settings.
#[derive(clap::Args, Debug)]
pub(crate) struct ClientAgentArgs {
    /// Protocol.
    #[arg(long, value_enum)]
    pub(crate) kind: Kind,
    /// Server address.
    #[arg(long)]
    pub(crate) addr: SocketAddr,
    /// Source address to bind each client socket to (127.0.0.x spreads the ephemeral ports).
    #[arg(long)]
    pub(crate) src: IpAddr,
    /// Global index of this agent's first client (ids are `c<index>`).
    #[arg(long)]
    pub(crate) first: usize,
    /// How many clients this agent holds.
    #[arg(long)]
    pub(crate) count: usize,
    /// Connection attempts in flight.
    #[arg(long, default_value_t = 128)]
    pub(crate) concurrency: usize,
    /// Heartbeat the tether clients request / MQTT keepalive, in milliseconds.
    #[arg(long)]
    pub(crate) heartbeat_ms: u64,
    /// The tether policy's detection bound, in milliseconds.
    #[arg(long)]
    pub(crate) detect_within_ms: u64,
    /// Speak TLS, trusting the test CA in this directory (`tether_lab::test_tls`).
    #[arg(long)]
    pub(crate) tls_dir: Option<std::path::PathBuf>,
}

/// The bench's TLS server configuration from the test material in `dir`.
fn tls_server(dir: &std::path::Path) -> anyhow::Result<tether::tls::TlsServer> {
    tether::tls::TlsServer::from_files(tether::tls::ServerTlsFiles::new(
        dir.join("server.pem"),
        dir.join("server.key"),
    ))
    .context("bench tls server")
}

/// The bench's TLS client configuration (trusting the test CA in `dir`).
fn tls_client(dir: &std::path::Path) -> anyhow::Result<tether::tls::TlsClient> {
    tether::tls::TlsClient::new(&tether::tls::ClientTlsOptions {
        ca: Some(dir.join("ca.pem")),
        server_name: Some(tether_lab::test_tls::SERVER_NAME.into()),
        ..Default::default()
    })
    .context("bench tls client")
}

pub(crate) fn run(cmd: AgentCmd) -> anyhow::Result<std::process::ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(async {
        match cmd {
            AgentCmd::Server(a) => server_agent(a).await,
            AgentCmd::Clients(a) => client_agent(a).await,
            AgentCmd::ApiClients(a) => api_client_agent(a).await,
        }
    })?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// Writes one JSON line to stdout (the coordinator reads them).
pub(crate) fn emit(v: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

pub(crate) fn policy(detect_within_ms: u64, heartbeat_ms: Option<u64>) -> anyhow::Result<Policy> {
    let mut b = Policy::builder(Duration::from_millis(detect_within_ms));
    if let Some(h) = heartbeat_ms {
        b = b.heartbeat(Duration::from_millis(h));
    }
    b.build().context("invalid bench policy")
}

async fn server_agent(a: ServerAgentArgs) -> anyhow::Result<()> {
    let policy = policy(a.detect_within_ms, a.heartbeat_ms)?;
    let mut cfg = ServerConfig::new(SocketAddr::new(a.listen, 0))
        .policy(policy.clone())
        .max_connections(1_000_000)
        // A/B switch for measuring the parked-connection step in one binary (BENCHMARKS.md
        // 2026-11-30 "fourth pass"): `TETHER_BENCH_NO_PARK=1` keeps every connection in
        // its own task, as before it.
        .park_idle(std::env::var_os("TETHER_BENCH_NO_PARK").is_none_or(|v| v != "1"));
    if let Some(dir) = &a.tls_dir {
        cfg = cfg.tls(Arc::new(tls_server(dir)?));
    }
    if let Some(n) = a.park_threads {
        cfg = cfg.park_threads(n);
    }
    let mut server = Server::bind(cfg).await.context("cannot bind")?;
    let handle = server.handle();
    let mut presence = handle.subscribe();
    // Drain server events (received messages count against the server's backlog until
    // taken). Within tokio's cooperative budget, as an application's consumer would be: the
    // backlog is bounded (`max_queued_bytes`), so a consumer that falls behind pauses the
    // readers instead of growing the queue. It used to run `unconstrained` (from before the
    // backlog had a bound): under 256 loaders it then never yielded while events kept
    // coming, held its worker for seconds at a time, and every connection task queued on
    // that worker waited — thousands of healthy clients heard nothing for 5 s and closed
    // (6,000–16,000 false Offlines per run; 0 with this, BENCHMARKS.md 2026-11-30 "third
    // pass").
    tokio::spawn(async move { while server.next_event().await.is_some() {} });
    // Unconstrained too: a presence burst (thousands of Offlines at once) must not overflow
    // the server's bounded broadcast because this task yields every 128 events.
    tokio::spawn(tokio::task::unconstrained(async move {
        loop {
            match presence.recv().await {
                Ok(ch) => match &ch.to {
                    PresenceState::Offline {
                        reason, silent_for, ..
                    } => emit(json!({
                        "ev": "offline", "id": ch.id, "at_ns": instant_ns(ch.at),
                        "reason": reason.label(), "detail": reason.to_string(), "silent_ms": silent_for.as_secs_f64() * 1e3,
                    })),
                    PresenceState::Suspect => {
                        emit(json!({"ev": "suspect", "id": ch.id, "at_ns": instant_ns(ch.at)}))
                    }
                    _ => {}
                },
                Err(RecvError::Lagged(n)) => emit(json!({"ev": "lagged", "n": n})),
                Err(RecvError::Closed) => return,
            }
        }
    }));
    emit(json!({
        "ev": "listening", "addr": handle.local_addr().to_string(),
        "heartbeat_ms": policy.heartbeat_interval.as_millis() as u64,
        "dead_after_ms": policy.dead_after.as_millis() as u64,
        "detect_within_ms": policy.detect_within.as_millis() as u64,
        "park_threads": handle.park_threads(),
    }));
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        match line.trim() {
            "metrics" => {
                let m = handle.metrics();
                emit(json!({
                    "ev": "metrics", "connections": m.connections,
                    "online": m.presence.online, "suspect": m.presence.suspect,
                    "offline": m.presence.offline,
                    "hb_sent": m.heartbeats_sent, "hb_received": m.heartbeats_received,
                    "msgs_in": m.messages_received, "accepted": m.accepted,
                    "heap": heap_in_use(),
                }));
            }
            "quit" => break,
            _ => {}
        }
    }
    Ok(())
}

/// Bytes the allocator has handed out and not taken back (glibc `mallinfo2`: arena bytes in
/// use plus mmapped blocks), to tell heap growth from other resident memory.
fn heap_in_use() -> u64 {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let mi = unsafe { libc::mallinfo2() };
    (mi.uordblks + mi.hblkhd) as u64
}

/// Sockets of silenced clients, kept open forever: a blackhole closes nothing.
static GRAVEYARD: Mutex<Vec<TcpStream>> = Mutex::new(Vec::new());

/// Blackhole switch and last-write time of one client.
#[derive(Debug, Default)]
pub(crate) struct Hole {
    holed: AtomicBool,
    last_write_ns: AtomicU64,
}

/// A TCP stream that can be blackholed in userspace: once holed it reads nothing, swallows
/// writes, and never closes the socket (no FIN, no RST reach the server).
struct Holeable {
    s: Option<TcpStream>,
    hole: Arc<Hole>,
}

impl Holeable {
    fn holed(&self) -> bool {
        self.hole.holed.load(Relaxed)
    }
    fn stream(&mut self) -> std::io::Result<&mut TcpStream> {
        self.s
            .as_mut()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotConnected))
    }
}

impl AsyncRead for Holeable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.holed() {
            return Poll::Pending;
        }
        match self.stream() {
            Ok(s) => Pin::new(s).poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for Holeable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.holed() {
            return Poll::Ready(Ok(buf.len()));
        }
        let r = match self.stream() {
            Ok(s) => Pin::new(s).poll_write(cx, buf),
            Err(e) => return Poll::Ready(Err(e)),
        };
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                self.hole.last_write_ns.store(mono_ns(), Relaxed);
            }
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.holed() {
            return Poll::Ready(Ok(()));
        }
        match self.stream() {
            Ok(s) => Pin::new(s).poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.holed() {
            return Poll::Ready(Ok(()));
        }
        match self.stream() {
            Ok(s) => Pin::new(s).poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl Transport for Holeable {}

impl Drop for Holeable {
    fn drop(&mut self) {
        if self.holed() {
            if let Some(s) = self.s.take() {
                GRAVEYARD.lock().unwrap_or_else(|e| e.into_inner()).push(s);
            }
        }
    }
}

/// Connects from `src` (any port) to `addr`. `IP_BIND_ADDRESS_NO_PORT` lets the kernel pick
/// the port at connect time per 4-tuple, so one source address serves many servers.
async fn connect_from(src: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_nonblocking(true)?;
    if src.is_ipv4() {
        let one: libc::c_int = 1;
        // SAFETY: valid fd, option value points to a c_int of the given length.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    sock.bind(&SocketAddr::new(src, 0).into())?;
    let std_stream: std::net::TcpStream = sock.into();
    let s = TcpSocket::from_std_stream(std_stream);
    s.connect(addr).await
}

enum Held {
    Tether { conn: Connection, hole: Arc<Hole> },
    Mqtt,
}

#[derive(Default)]
struct Counters {
    connected: AtomicU64,
    failed: AtomicU64,
    pings: AtomicU64,
    mqtt_closed: AtomicU64,
}

async fn client_agent(a: ClientAgentArgs) -> anyhow::Result<()> {
    let tls = a.tls_dir.as_deref().map(tls_client).transpose()?;
    let a = Arc::new((a, tls));
    let n_first = a.0.first;
    let counters = Arc::new(Counters::default());
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    emit(json!({"ev": "ready"}));
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    // Wait for "go" so that every agent starts connecting at the same moment.
    loop {
        match lines.next_line().await? {
            Some(l) if l.trim() == "go" => break,
            Some(_) => {}
            None => return Ok(()),
        }
    }
    let t0 = std::time::Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(a.0.concurrency.max(1)));
    let mut tasks = Vec::with_capacity(a.0.count);
    for i in 0..a.0.count {
        let permit = sem.clone().acquire_owned().await?;
        let (a, c, first_error) = (a.clone(), counters.clone(), first_error.clone());
        tasks.push(tokio::spawn(async move {
            let r = connect_one(&a.0, a.1.as_ref(), a.0.first + i, &c, permit).await;
            match r {
                Ok(h) => {
                    c.connected.fetch_add(1, Relaxed);
                    Some(h)
                }
                Err(e) => {
                    c.failed.fetch_add(1, Relaxed);
                    first_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(format!("{e:#}"));
                    None
                }
            }
        }));
        if i % 1000 == 999 {
            emit(
                json!({"ev": "progress", "connected": counters.connected.load(Relaxed),
                        "failed": counters.failed.load(Relaxed)}),
            );
        }
    }
    let mut held: Vec<Option<Held>> = Vec::with_capacity(a.0.count);
    for t in tasks {
        held.push(t.await.ok().flatten());
    }
    let secs = t0.elapsed().as_secs_f64();
    let err = first_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    emit(
        json!({"ev": "connected", "n": counters.connected.load(Relaxed),
                "failed": counters.failed.load(Relaxed), "secs": secs, "error": err}),
    );

    let load_stop = Arc::new(AtomicBool::new(false));
    let load_sent = Arc::new(AtomicU64::new(0));
    let mut load_tasks: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["silence", m] => {
                let m: usize = m.parse().context("silence modulus")?;
                let mut out = Vec::new();
                let t = mono_ns();
                for (i, h) in held.iter().enumerate() {
                    if let Some(Held::Tether { hole, .. }) = h {
                        if (n_first + i) % m == 0 {
                            hole.holed.store(true, Relaxed);
                            out.push(json!([
                                format!("c{}", n_first + i),
                                hole.last_write_ns.load(Relaxed)
                            ]));
                        }
                    }
                }
                emit(json!({"ev": "silenced", "t_ns": t, "clients": out}));
            }
            ["load", k, size] => {
                let k: usize = k.parse().context("loaders")?;
                let size: usize = size.parse().context("message size")?;
                load_stop.store(false, Relaxed);
                let msg = Bytes::from(vec![0x5a; size]);
                let senders = held
                    .iter()
                    .filter_map(|h| match h {
                        Some(Held::Tether { conn, .. }) => Some(conn.sender()),
                        _ => None,
                    })
                    .take(k);
                for s in senders {
                    let (stop, sent, msg) = (load_stop.clone(), load_sent.clone(), msg.clone());
                    load_tasks.push(tokio::spawn(async move {
                        let mut n = 0u64;
                        while !stop.load(Relaxed) {
                            if s.send(msg.clone()).await.is_err() {
                                break;
                            }
                            n += 1;
                            if n % 64 == 0 {
                                sent.fetch_add(64, Relaxed);
                                tokio::task::yield_now().await;
                            }
                        }
                    }));
                }
                emit(json!({"ev": "loading", "loaders": load_tasks.len()}));
            }
            ["unload"] => {
                load_stop.store(true, Relaxed);
                for t in load_tasks.drain(..) {
                    let _ = t.await;
                }
                emit(json!({"ev": "unloaded", "sent": load_sent.load(Relaxed)}));
            }
            ["stats"] => {
                let mut closed = counters.mqtt_closed.load(Relaxed);
                let (mut hb_out, mut hb_in) = (0, 0);
                for h in held.iter().flatten() {
                    if let Held::Tether { conn, .. } = h {
                        if conn.disconnected().is_some() {
                            closed += 1;
                        }
                        let s = conn.stats();
                        hb_out += s.heartbeats_out;
                        hb_in += s.heartbeats_in;
                    }
                }
                emit(
                    json!({"ev": "stats", "closed": closed, "hb_out": hb_out, "hb_in": hb_in,
                            "pings": counters.pings.load(Relaxed)}),
                );
            }
            ["quit"] => break,
            _ => {}
        }
    }
    Ok(())
}

async fn connect_one(
    a: &ClientAgentArgs,
    tls: Option<&tether::tls::TlsClient>,
    index: usize,
    counters: &Arc<Counters>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> anyhow::Result<Held> {
    let id = format!("c{index}");
    let work = async {
        let stream = connect_from(a.src, a.addr)
            .await
            .with_context(|| format!("connect {} from {}", a.addr, a.src))?;
        let _ = stream.set_nodelay(true);
        match a.kind {
            Kind::Tether => {
                let hole = Arc::new(Hole::default());
                let io = Holeable {
                    s: Some(stream),
                    hole: hole.clone(),
                };
                let p = policy(a.detect_within_ms, Some(a.heartbeat_ms))?;
                let opts = ConnectOptions::new(id).policy(p);
                let conn = match tls {
                    None => Connection::client_over(io, &opts).await,
                    Some(tls) => {
                        let io = tls
                            .connect(tether_lab::test_tls::SERVER_NAME, io)
                            .await
                            .context("tls handshake")?;
                        Connection::client_over(io, &opts).await
                    }
                }
                .context("tether handshake")?;
                Ok(Held::Tether { conn, hole })
            }
            Kind::Mqtt => {
                let mut s = stream;
                let keepalive = (a.heartbeat_ms / 1000).clamp(1, 65535) as u16;
                s.write_all(&mqtt_connect(&id, keepalive)).await?;
                let mut ack = [0u8; 4];
                s.read_exact(&mut ack).await.context("CONNACK")?;
                if ack[0] != 0x20 || ack[3] != 0 {
                    anyhow::bail!("broker refused: CONNACK {ack:02x?}");
                }
                let counters = counters.clone();
                let period = Duration::from_secs(u64::from(keepalive));
                tokio::spawn(async move {
                    if mqtt_keepalive(s, period, &counters).await.is_err() {
                        counters.mqtt_closed.fetch_add(1, Relaxed);
                    }
                });
                Ok(Held::Mqtt)
            }
        }
    };
    let r = tokio::time::timeout(Duration::from_secs(30), work)
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("connect timed out after 30 s")));
    drop(permit);
    r
}

/// MQTT 3.1.1 CONNECT: clean session, no will, no credentials.
pub(crate) fn mqtt_connect(client_id: &str, keepalive_s: u16) -> Vec<u8> {
    let id = client_id.as_bytes();
    let mut var = Vec::with_capacity(12 + id.len());
    var.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02]);
    var.extend_from_slice(&keepalive_s.to_be_bytes());
    var.extend_from_slice(&(id.len() as u16).to_be_bytes());
    var.extend_from_slice(id);
    let mut out = vec![0x10];
    let mut len = var.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(&var);
    out
}

/// PINGREQ every `period`, expecting PINGRESP; returns when the broker goes away.
async fn mqtt_keepalive(
    mut s: TcpStream,
    period: Duration,
    counters: &Counters,
) -> std::io::Result<()> {
    loop {
        tokio::time::sleep(period).await;
        s.write_all(&[0xc0, 0x00]).await?;
        let mut resp = [0u8; 2];
        s.read_exact(&mut resp).await?;
        if resp != [0xd0, 0x00] {
            return Err(std::io::Error::other(
                "unexpected packet instead of PINGRESP",
            ));
        }
        counters.pings.fetch_add(1, Relaxed);
    }
}

/// `api-clients`: `count` tether `Client`s; each message received is stamped with its send
/// time (`t` + 20 digits of `CLOCK_MONOTONIC` ns), so the receipt gives the latency.
/// Commands: `count`, `stats` (and reset the samples), `send K` (every client sends K stamped
/// messages), `quit`.
async fn api_client_agent(a: ApiClientArgs) -> anyhow::Result<()> {
    use tether::{Client, ClientConfig, ClientEvent};
    let received = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(AtomicU64::new(0));
    let samples: Arc<Mutex<Vec<u64>>> = Arc::default();
    let mut senders = Vec::with_capacity(a.count);
    let mut started = 0u64;
    for i in 0..a.count {
        let mut cfg = ClientConfig::new(a.addr, format!("c{}", a.first + i));
        cfg.connect.policy = policy(60_000, None)?;
        // A source address per 250 clients (127.B.x.y): the server's per-source limit is
        // an eighth of its connection limit.
        let src = match a.src {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                IpAddr::from([o[0], o[1], (i / 250) as u8, (i % 250 + 1) as u8])
            }
            other => other,
        };
        let addr = a.addr;
        let mut client = Client::start_with(cfg, move || async move {
            let sock = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            sock.bind(SocketAddr::new(src, 0))?;
            let s = sock.connect(addr).await?;
            s.set_nodelay(true)?;
            Ok::<_, std::io::Error>(s)
        });
        senders.push(client.sender());
        let (got, up, lat) = (received.clone(), connected.clone(), samples.clone());
        tokio::spawn(async move {
            while let Some(ev) = client.next_event().await {
                match ev {
                    ClientEvent::Connected { .. } => {
                        up.fetch_add(1, Relaxed);
                    }
                    ClientEvent::Message(m) => {
                        let stamp = m
                            .get(1..21)
                            .and_then(|d| std::str::from_utf8(d).ok())
                            .and_then(|d| d.parse::<u64>().ok());
                        if let Some(ts) = stamp {
                            let us = mono_ns().saturating_sub(ts) / 1000;
                            lat.lock().unwrap_or_else(|e| e.into_inner()).push(us);
                        }
                        got.fetch_add(1, Relaxed);
                    }
                    _ => {}
                }
            }
        });
        started += 1;
        // Batches of 256: the server's handshake cap is 1,024.
        if started % 256 == 0 {
            while connected.load(Relaxed) < started {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    while connected.load(Relaxed) < started {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    emit(json!({"ev": "ready", "clients": a.count}));
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("count") => emit(json!({"ev": "count", "received": received.load(Relaxed)})),
            Some("stats") => {
                let lat: Vec<u64> =
                    std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()));
                emit(json!({"ev": "stats", "received": received.swap(0, Relaxed), "lat_us": lat}));
            }
            Some("send") => {
                let k: usize = words.next().and_then(|w| w.parse().ok()).unwrap_or(1);
                for _ in 0..k {
                    for s in &senders {
                        let mut b = format!("t{:020}", mono_ns()).into_bytes();
                        b.resize(32, b'.');
                        let _ = s.send(Bytes::from(b)).await;
                    }
                }
                emit(json!({"ev": "sent"}));
            }
            Some("quit") | None => break,
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_connect_bytes() {
        let p = mqtt_connect("c1", 30);
        assert_eq!(
            p,
            vec![0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30, 0, 2, b'c', b'1']
        );
        // Remaining length above 127 takes two bytes.
        let long = "x".repeat(200);
        let p = mqtt_connect(&long, 30);
        assert_eq!(&p[..3], &[0x10, (212 % 128) as u8 | 0x80, 1]);
    }

    #[tokio::test]
    async fn blackholed_client_sends_nothing_and_never_closes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let s = connect_from("127.0.0.1".parse().unwrap(), addr)
                .await
                .unwrap();
            let hole = Arc::new(Hole::default());
            let mut io = Holeable {
                s: Some(s),
                hole: hole.clone(),
            };
            io.write_all(b"hi").await.unwrap();
            assert!(hole.last_write_ns.load(Relaxed) > 0);
            hole.holed.store(true, Relaxed);
            io.write_all(b"swallowed").await.unwrap();
            io.shutdown().await.unwrap();
            drop(io);
        });
        let (mut srv, _) = listener.accept().await.unwrap();
        client.await.unwrap();
        let mut buf = [0u8; 16];
        let n = srv.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"hi");
        // Neither data nor FIN follows.
        let r = tokio::time::timeout(Duration::from_millis(200), srv.read(&mut buf)).await;
        assert!(r.is_err(), "expected silence, got {r:?}");
    }
}
