//! `tether probe`: measuring a path's idle timeout (how long a NAT, load balancer or firewall
//! keeps an idle TCP flow) in not much more wall time than the timeout itself.
//!
//! The responder half ([`respond`]) runs inside [`Server`](crate::Server) for connections
//! whose first frame is PROBE; the client half is [`run`]; the schedule and the bracketing
//! logic are sans-IO in [`ladder`]. The exchange is documented in `docs/PROBE.md`.
//!
//! ```text
//!  client                                         responder (tether serve)
//!   │ "TTHR" 1, PROBE{v1, mode, session, index, delay_ms, grace_ms}  ─▶
//!   │ ◀─  "TTHR" 1, PROBE{v1, mode, session, index}     (or REFUSE)
//!   │                    … raw bytes from here on, no heartbeats …
//!   │ control:      PING(n) every grace/2 ─▶ ◀─ PONG(n);  ◀─ REPORT(index, outcome)
//!   │ client-first: idle delay, 'T' ─▶ ◀─ 'E'       (no 'E' within grace: expired)
//!   │ server-first: ◀─ 'S' after delay idle, 'A' ─▶  (responder REPORTs what it saw)
//! ```

pub mod client;
pub mod ladder;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tether_proto::codec::{self, Frame};
use tether_proto::CloseCode;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::driver::Transport;

pub use client::{run, ProbeConfig, ProbeError, ProbeReport, Progress};
pub use ladder::{Direction, DirectionResult, Expiry, Outcome};

/// The probe exchange version this implementation speaks.
pub const PROBE_VERSION: u8 = 1;
/// Length of a PROBE request body (after the frame type byte).
pub const REQUEST_LEN: usize = 22;
/// Length of a PROBE answer body (after the frame type byte).
pub const ANSWER_LEN: usize = 14;
/// Length of one control message.
pub const CONTROL_MSG_LEN: usize = 16;
/// Longest idle period a request may ask for (a day).
pub const MAX_DELAY: Duration = Duration::from_secs(24 * 3600);
/// Longest grace period a request may ask for.
pub const MAX_GRACE: Duration = Duration::from_secs(60);
/// A control connection that hears nothing for this long is closed by the responder.
pub const CONTROL_IDLE_LIMIT: Duration = Duration::from_secs(30);

/// The client-first test byte.
pub const TEST_BYTE: u8 = b'T';
/// The responder's echo of [`TEST_BYTE`].
pub const ECHO_BYTE: u8 = b'E';
/// The server-first test byte.
pub const SERVER_BYTE: u8 = b'S';
/// The client's acknowledgement of [`SERVER_BYTE`].
pub const ACK_BYTE: u8 = b'A';

/// Control message kinds (first byte of a 16-byte control message).
pub mod control {
    /// Client → responder: `value` is a sequence number to echo.
    pub const PING: u8 = 1;
    /// Responder → client: the PING's `value`.
    pub const PONG: u8 = 2;
    /// Responder → client: the outcome of server-first connection `index` (`outcome` byte).
    pub const REPORT: u8 = 3;
}

/// Outcome bytes in a REPORT.
pub mod report {
    /// The client acknowledged the server's byte.
    pub const ALIVE: u8 = 0;
    /// No acknowledgement within the grace period.
    pub const SILENT: u8 = 1;
    /// The responder's socket was reset.
    pub const RESET: u8 = 2;
    /// The responder saw an orderly close (FIN).
    pub const CLOSE: u8 = 3;
}

/// What a probe connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Frequent pings, and reports of server-first outcomes for the session.
    Control,
    /// The client speaks first after the idle period.
    ClientFirst,
    /// The responder speaks first after `delay` of idle.
    ServerFirst,
}

impl Mode {
    fn byte(self) -> u8 {
        match self {
            Mode::Control => 1,
            Mode::ClientFirst => 2,
            Mode::ServerFirst => 3,
        }
    }
    fn from_byte(b: u8) -> Option<Mode> {
        match b {
            1 => Some(Mode::Control),
            2 => Some(Mode::ClientFirst),
            3 => Some(Mode::ServerFirst),
            _ => None,
        }
    }
}

/// The body of a PROBE request (`docs/PROBE.md`).
///
/// ```text
///  version:u8 mode:u8 session:u64 index:u32 delay_ms:u32 grace_ms:u32   (22 bytes, big-endian)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// What the connection is for.
    pub mode: Mode,
    /// Random id shared by every connection of one probe run.
    pub session: u64,
    /// Connection index within the session (echoed in the answer and in REPORTs).
    pub index: u32,
    /// The idle period: server-first, when the responder speaks; client-first, when the
    /// client will (the responder keeps the connection that long plus slack).
    pub delay: Duration,
    /// How long an answer may take before the test counts as failed.
    pub grace: Duration,
}

/// Why a PROBE request body was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RequestError {
    /// Shorter than the fixed fields.
    #[error("probe request of {len} bytes, expected at least {REQUEST_LEN}")]
    Short {
        /// Bytes received.
        len: usize,
    },
    /// A version this responder does not speak.
    #[error("unsupported probe version {0}, this responder speaks {PROBE_VERSION}")]
    Version(u8),
    /// An unknown mode byte.
    #[error("unknown probe mode {0}")]
    Mode(u8),
    /// Delay or grace beyond the limits.
    #[error("probe delay {delay_ms} ms or grace {grace_ms} ms out of range")]
    Range {
        /// Requested delay.
        delay_ms: u32,
        /// Requested grace.
        grace_ms: u32,
    },
}

impl Request {
    /// Encodes the body (without the frame type byte).
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(REQUEST_LEN);
        b.put_u8(PROBE_VERSION);
        b.put_u8(self.mode.byte());
        b.put_u64(self.session);
        b.put_u32(self.index);
        b.put_u32(u32::try_from(self.delay.as_millis()).unwrap_or(u32::MAX));
        b.put_u32(u32::try_from(self.grace.as_millis()).unwrap_or(u32::MAX));
        b.freeze()
    }

    /// Parses a body. Trailing bytes are ignored (room for later fields).
    pub fn parse(mut b: &[u8]) -> Result<Request, RequestError> {
        if b.len() < REQUEST_LEN {
            // A version byte alone is enough to tell a newer client what we speak.
            if let Some(&v) = b.first() {
                if v != PROBE_VERSION {
                    return Err(RequestError::Version(v));
                }
            }
            return Err(RequestError::Short { len: b.len() });
        }
        let v = b.get_u8();
        if v != PROBE_VERSION {
            return Err(RequestError::Version(v));
        }
        let m = b.get_u8();
        let mode = Mode::from_byte(m).ok_or(RequestError::Mode(m))?;
        let session = b.get_u64();
        let index = b.get_u32();
        let delay_ms = b.get_u32();
        let grace_ms = b.get_u32();
        let delay = Duration::from_millis(u64::from(delay_ms));
        let grace = Duration::from_millis(u64::from(grace_ms));
        if delay > MAX_DELAY || grace > MAX_GRACE || grace.is_zero() {
            return Err(RequestError::Range { delay_ms, grace_ms });
        }
        Ok(Request {
            mode,
            session,
            index,
            delay,
            grace,
        })
    }

    /// The answer body for this request: version, mode, session, index.
    pub fn answer(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(ANSWER_LEN);
        b.put_u8(PROBE_VERSION);
        b.put_u8(self.mode.byte());
        b.put_u64(self.session);
        b.put_u32(self.index);
        b.freeze()
    }
}

/// Encodes a 16-byte control message: `kind:u8 outcome:u8 reserved:u16 index:u32 value:u64`.
pub fn control_msg(kind: u8, outcome: u8, index: u32, value: u64) -> [u8; CONTROL_MSG_LEN] {
    let mut m = [0u8; CONTROL_MSG_LEN];
    m[0] = kind;
    m[1] = outcome;
    m[4..8].copy_from_slice(&index.to_be_bytes());
    m[8..16].copy_from_slice(&value.to_be_bytes());
    m
}

/// Decodes a control message into `(kind, outcome, index, value)`.
pub fn parse_control_msg(m: &[u8; CONTROL_MSG_LEN]) -> (u8, u8, u32, u64) {
    let index = u32::from_be_bytes([m[4], m[5], m[6], m[7]]);
    let mut v = [0u8; 8];
    v.copy_from_slice(&m[8..16]);
    (m[0], m[1], index, u64::from_be_bytes(v))
}

/// A report for a control connection: (connection index, outcome byte, idle µs).
type ReportMsg = (u32, u8, u64);
/// Live control connections by session (with a registration id), so that server-first
/// connections can report.
type SessionMap = HashMap<u64, (u64, mpsc::UnboundedSender<ReportMsg>)>;
type Sessions = Mutex<SessionMap>;

fn sessions() -> &'static Sessions {
    static S: OnceLock<Sessions> = OnceLock::new();
    S.get_or_init(Default::default)
}

fn lock_sessions() -> std::sync::MutexGuard<'static, SessionMap> {
    sessions().lock().unwrap_or_else(|e| e.into_inner())
}

fn report_outcome(session: u64, index: u32, outcome: u8, idle: Duration) {
    if let Some((_, tx)) = lock_sessions().get(&session) {
        let _ = tx.send((index, outcome, idle.as_micros() as u64));
    }
}

/// A probe connection must measure the path, not the server's keepalive: turn off TCP
/// keepalive (which `Server` set from its policy) when the transport is a TCP socket.
fn quiet_socket<T: Transport>(io: &T) {
    if let Some(tcp) = (io as &dyn std::any::Any).downcast_ref::<tokio::net::TcpStream>() {
        let s = socket2::SockRef::from(tcp);
        let _ = s.set_keepalive(false);
        let _ = s.set_nodelay(true);
        #[cfg(target_os = "linux")]
        let _ = s.set_tcp_user_timeout(None);
    }
}

fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
    )
}

/// Answers one probe connection (its PROBE frame's body is `request`).
///
/// A malformed or unsupported request is answered with a REFUSE frame. Otherwise the answer
/// is the preamble and a PROBE frame echoing version, mode, session and index; after it the
/// connection carries raw bytes as `docs/PROBE.md` describes. Every wait is bounded by the
/// request's delay and grace (themselves bounded), so a half-open probe connection is
/// released on its own.
pub async fn respond<T: Transport>(mut io: T, request: Bytes) {
    quiet_socket(&io);
    let mut out = BytesMut::new();
    codec::encode_preamble(&mut out);
    let req = match Request::parse(&request) {
        Ok(r) => r,
        Err(e) => {
            codec::encode(
                &Frame::Refuse {
                    code: CloseCode::PROTOCOL_ERROR,
                    text: e.to_string(),
                },
                &mut out,
            );
            let _ = io.write_all(&out).await;
            let _ = io.shutdown().await;
            return;
        }
    };
    // Register the control connection before answering, so that no report can race it.
    let registration = if req.mode == Mode::Control {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        lock_sessions().insert(req.session, (id, tx));
        Some((id, rx))
    } else {
        None
    };
    codec::encode(&Frame::Probe(req.answer()), &mut out);
    if io.write_all(&out).await.is_err() {
        return;
    }
    match (req.mode, registration) {
        (Mode::Control, Some((id, rx))) => {
            respond_control(&mut io, rx).await;
            let mut s = lock_sessions();
            if s.get(&req.session).is_some_and(|(i, _)| *i == id) {
                s.remove(&req.session);
            }
        }
        (Mode::ClientFirst, _) => respond_client_first(&mut io, &req).await,
        (Mode::ServerFirst, _) => {
            let (outcome, idle) = respond_server_first(&mut io, &req).await;
            report_outcome(req.session, req.index, outcome, idle);
        }
        (Mode::Control, None) => {}
    }
    let _ = io.shutdown().await;
}

async fn respond_control<T: Transport>(
    io: &mut T,
    mut reports: mpsc::UnboundedReceiver<ReportMsg>,
) {
    let mut buf = [0u8; CONTROL_MSG_LEN];
    let mut got = 0;
    loop {
        tokio::select! {
            r = tokio::time::timeout(CONTROL_IDLE_LIMIT, io.read(&mut buf[got..])) => {
                match r {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                    Ok(Ok(n)) => {
                        got += n;
                        if got < CONTROL_MSG_LEN {
                            continue;
                        }
                        got = 0;
                        let (kind, _, index, value) = parse_control_msg(&buf);
                        if kind != control::PING {
                            return;
                        }
                        let m = control_msg(control::PONG, 0, index, value);
                        if io.write_all(&m).await.is_err() {
                            return;
                        }
                    }
                }
            }
            Some((index, outcome, idle_us)) = reports.recv() => {
                let m = control_msg(control::REPORT, outcome, index, idle_us);
                if io.write_all(&m).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn respond_client_first<T: Transport>(io: &mut T, req: &Request) {
    // Echo every test byte; give up once the client is overdue by a wide margin.
    let limit = req.delay + req.grace * 4 + Duration::from_secs(10);
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout_at(deadline, io.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                let echoes = buf[..n].iter().filter(|&&b| b == TEST_BYTE).count();
                let reply = vec![ECHO_BYTE; echoes];
                if io.write_all(&reply).await.is_err() {
                    return;
                }
            }
            _ => return,
        }
    }
}

async fn respond_server_first<T: Transport>(io: &mut T, req: &Request) -> (u8, Duration) {
    let since = tokio::time::Instant::now();
    let mut buf = [0u8; 64];
    // Wait out the idle period; anything from the client ends it early (it gave up).
    match tokio::time::timeout(req.delay, io.read(&mut buf)).await {
        Err(_) => {}
        Ok(Ok(0)) => return (report::CLOSE, since.elapsed()),
        Ok(Ok(_)) => return (report::ALIVE, since.elapsed()),
        Ok(Err(e)) if is_reset(&e) => return (report::RESET, since.elapsed()),
        Ok(Err(_)) => return (report::SILENT, since.elapsed()),
    }
    // What was tested: the idle period up to this write (a late wake-up tests a longer one).
    let idle = since.elapsed();
    if let Err(e) = io.write_all(&[SERVER_BYTE]).await {
        return if is_reset(&e) {
            (report::RESET, idle)
        } else {
            (report::SILENT, idle)
        };
    }
    let outcome = match tokio::time::timeout(req.grace, io.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 && buf[..n].contains(&ACK_BYTE) => report::ALIVE,
        Ok(Ok(0)) => report::CLOSE,
        Ok(Ok(_)) => report::SILENT,
        Ok(Err(e)) if is_reset(&e) => report::RESET,
        Ok(Err(_)) | Err(_) => {
            // Half-open: do not leave the kernel retransmitting into the void.
            if let Some(tcp) = (&*io as &dyn std::any::Any).downcast_ref::<tokio::net::TcpStream>()
            {
                let _ = crate::sockopt::set_abortive_close(tcp);
            }
            report::SILENT
        }
    };
    (outcome, idle)
}

/// Seconds with two decimals, for messages.
pub(crate) fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_and_is_checked() {
        let r = Request {
            mode: Mode::ServerFirst,
            session: 0x0102_0304_0506_0708,
            index: 7,
            delay: Duration::from_millis(6_250),
            grace: Duration::from_millis(200),
        };
        let b = r.encode();
        assert_eq!(b.len(), REQUEST_LEN);
        assert_eq!(Request::parse(&b), Ok(r));
        let mut longer = b.to_vec();
        longer.extend_from_slice(b"future");
        assert_eq!(Request::parse(&longer), Ok(r));
        assert_eq!(Request::parse(&b[..5]), Err(RequestError::Short { len: 5 }));
        assert_eq!(Request::parse(&[2]), Err(RequestError::Version(2)));
        let mut bad = b.to_vec();
        bad[1] = 9;
        assert_eq!(Request::parse(&bad), Err(RequestError::Mode(9)));
        let mut huge = b.to_vec();
        huge[14..18].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            Request::parse(&huge),
            Err(RequestError::Range { .. })
        ));
        assert_eq!(r.answer().len(), ANSWER_LEN);
    }

    #[test]
    fn control_messages_round_trip() {
        let m = control_msg(control::REPORT, report::RESET, 42, 99);
        assert_eq!(
            parse_control_msg(&m),
            (control::REPORT, report::RESET, 42, 99)
        );
    }
}
