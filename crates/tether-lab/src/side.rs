//! One end of the lab connection: connects or accepts with a method's settings, exchanges a
//! greeting, then reads (and sends when told) and reports what it sees with a timestamp.
//!
//! A side runs on a current-thread tokio runtime, either on a thread that entered its host's
//! namespace or in a separate peer process (`process-crash`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use socket2::{SockRef, TcpKeepalive};
use tether_proto::Policy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::method::Method;
use crate::topology::Role;

/// What the coordinator tells a side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cmd {
    /// Send one message now.
    Send,
    /// Stop and drop the connection.
    Finish,
}

/// What a side reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// The server is listening.
    Listening,
    /// Connected, handshake (if any) and greeting done.
    Ready,
    /// A message arrived.
    Received(Instant),
    /// The side learned that its connection ended, and why (tether's reason labels).
    Closed(Instant, String),
    /// Setup failed.
    Failed(String),
}

/// What one side runs.
#[derive(Debug, Clone)]
pub(crate) struct SideSpec {
    pub(crate) role: Role,
    pub(crate) method: Method,
    pub(crate) policy: Policy,
    /// Where the server listens, or where the client connects.
    pub(crate) addr: SocketAddr,
    /// The side gives up and returns after this long, whatever happens.
    pub(crate) lifetime: Duration,
}

const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
const GREETING: &[u8] = b"hello";
const AFTER: &[u8] = b"after the fault";

/// A plain TCP connection with one of the non-tether methods. Messages are lines.
struct Plain {
    stream: TcpStream,
    buf: Vec<u8>,
    method: Method,
    /// The idle timer's deadline length (idle-timer only).
    read_deadline: Option<Duration>,
    last_rx: tokio::time::Instant,
}

impl Plain {
    fn new(stream: TcpStream, method: Method, policy: &Policy) -> std::io::Result<Plain> {
        let sock = SockRef::from(&stream);
        match method {
            Method::Keepalive => {
                if let Some(k) = policy.keepalive {
                    sock.set_tcp_keepalive(
                        &TcpKeepalive::new()
                            .with_time(k.idle)
                            .with_interval(k.interval)
                            .with_retries(k.count),
                    )?;
                }
            }
            Method::OsKeepalive => sock.set_keepalive(true)?,
            Method::UserTimeout => sock.set_tcp_user_timeout(policy.user_timeout)?,
            _ => {}
        }
        Ok(Plain {
            stream,
            buf: Vec::new(),
            method,
            read_deadline: (method == Method::IdleTimer).then_some(policy.dead_after),
            last_rx: tokio::time::Instant::now(),
        })
    }

    /// The next line. Cancel-safe: bytes already read stay in `buf`.
    async fn recv(&mut self) -> Result<Bytes, String> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Ok(Bytes::from(line[..pos].to_vec()));
            }
            let mut chunk = [0u8; 1024];
            let read = self.stream.read(&mut chunk);
            let n = match self.read_deadline {
                Some(d) => match tokio::time::timeout_at(self.last_rx + d, read).await {
                    Ok(r) => r,
                    Err(_) => return Err("idle-timeout".into()),
                },
                None => read.await,
            };
            match n {
                Ok(0) => return Err("peer-closed".into()),
                Ok(n) => {
                    self.last_rx = tokio::time::Instant::now();
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                Err(e) => return Err(classify(&e, self.method)),
            }
        }
    }

    async fn send(&mut self, msg: &[u8]) -> Result<(), String> {
        let mut line = msg.to_vec();
        line.push(b'\n');
        self.stream
            .write_all(&line)
            .await
            .map_err(|e| classify(&e, self.method))
    }
}

/// Names an OS error with tether's reason labels.
fn classify(e: &std::io::Error, method: Method) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNRESET) | Some(libc::EPIPE) => "peer-reset".into(),
        Some(libc::ETIMEDOUT) => match method {
            Method::Keepalive | Method::OsKeepalive => "keepalive-timeout".into(),
            Method::UserTimeout => "user-timeout".into(),
            _ => "io-error: timed out".into(),
        },
        _ => format!("io-error: {e}"),
    }
}

enum Conn {
    Plain(Plain),
    Tether(crate::tether_method::TetherSide),
}

impl Conn {
    async fn recv(&mut self) -> Result<Bytes, String> {
        match self {
            Conn::Plain(p) => p.recv().await,
            Conn::Tether(t) => t.recv().await,
        }
    }

    async fn send(&mut self, msg: &'static [u8]) -> Result<(), String> {
        match self {
            Conn::Plain(p) => p.send(msg).await,
            Conn::Tether(t) => t.send(Bytes::from_static(msg)).await,
        }
    }
}

async fn establish(spec: &SideSpec, emit: &mut impl FnMut(Event)) -> Result<Conn, String> {
    let stream = match spec.role {
        Role::Server => {
            let listener = TcpListener::bind(spec.addr)
                .await
                .map_err(|e| format!("bind {}: {e}", spec.addr))?;
            emit(Event::Listening);
            let (stream, _) = tokio::time::timeout(SETUP_TIMEOUT, listener.accept())
                .await
                .map_err(|_| "no client within 10 s".to_string())?
                .map_err(|e| format!("accept: {e}"))?;
            stream
        }
        Role::Client if spec.method.is_tether() => {
            let tls = spec.method == Method::TetherTls;
            return crate::tether_method::connect(spec.addr, &spec.policy, tls)
                .await
                .map(Conn::Tether);
        }
        Role::Client => tokio::time::timeout(SETUP_TIMEOUT, TcpStream::connect(spec.addr))
            .await
            .map_err(|_| format!("connect {}: timed out", spec.addr))?
            .map_err(|e| format!("connect {}: {e}", spec.addr))?,
    };
    if spec.method.is_tether() {
        let tls = spec.method == Method::TetherTls;
        return crate::tether_method::accept(stream, &spec.policy, tls)
            .await
            .map(Conn::Tether);
    }
    Plain::new(stream, spec.method, &spec.policy)
        .map(Conn::Plain)
        .map_err(|e| format!("socket options: {e}"))
}

enum Step {
    Got(Result<Bytes, String>),
    Cmd(Option<Cmd>),
    Expired,
}

/// Runs one side until told to finish, the connection ends, or `spec.lifetime` passes.
pub(crate) async fn run_side(
    spec: SideSpec,
    mut cmds: UnboundedReceiver<Cmd>,
    mut emit: impl FnMut(Event),
) {
    let end = tokio::time::Instant::now() + spec.lifetime;
    let mut conn = match establish(&spec, &mut emit).await {
        Ok(c) => c,
        Err(e) => return emit(Event::Failed(e)),
    };
    let greeting = async {
        conn.send(GREETING).await?;
        match conn.recv().await? {
            m if m.as_ref() == GREETING => Ok(()),
            m => Err(format!("unexpected greeting {m:?}")),
        }
    };
    match tokio::time::timeout(SETUP_TIMEOUT, greeting).await {
        Ok(Ok(())) => emit(Event::Ready),
        Ok(Err(e)) => return emit(Event::Failed(format!("greeting: {e}"))),
        Err(_) => return emit(Event::Failed("greeting: timed out".into())),
    }
    loop {
        let step = tokio::select! {
            r = conn.recv() => Step::Got(r),
            c = cmds.recv() => Step::Cmd(c),
            _ = tokio::time::sleep_until(end) => Step::Expired,
        };
        match step {
            Step::Got(Ok(_)) => emit(Event::Received(Instant::now())),
            Step::Got(Err(reason)) => {
                emit(Event::Closed(Instant::now(), reason));
                break;
            }
            Step::Cmd(Some(Cmd::Send)) => {
                if let Err(reason) = conn.send(AFTER).await {
                    emit(Event::Closed(Instant::now(), reason));
                    break;
                }
            }
            Step::Cmd(Some(Cmd::Finish)) | Step::Cmd(None) | Step::Expired => return,
        }
    }
    // The connection is gone; stay until told to finish so the coordinator decides when
    // the namespace goes away.
    tokio::select! {
        _ = async { while let Some(c) = cmds.recv().await { if c == Cmd::Finish { break } } } => {}
        _ = tokio::time::sleep_until(end) => {}
    }
}
