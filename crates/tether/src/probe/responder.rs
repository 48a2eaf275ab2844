//! The responder half of the probe: runs inside [`Server`](crate::Server) for connections
//! whose first frame is PROBE (`docs/PROBE.md`).
//!
//! ```text
//!  control       PING ─▶ PONG; REPORTs of this session's server-first connections
//!  client-first  echo every 'T' with 'E' until delay + 4·grace + 10 s
//!  server-first  wait delay, 'S' ─▶, wait grace for 'A', REPORT(outcome, idle tested)
//! ```

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tether_proto::codec::{self, Frame};
use tether_proto::wire::probe::{
    control, report, ControlMsg, Mode, Request, ACK_BYTE, CONTROL_MSG_LEN, ECHO_BYTE, SERVER_BYTE,
    TEST_BYTE,
};
use tether_proto::CloseCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{is_reset, CONTROL_IDLE_LIMIT};
use crate::Transport;

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
    let io = io as &dyn std::any::Any;
    let tcp = io.downcast_ref::<tokio::net::TcpStream>().or_else(|| {
        match io.downcast_ref::<crate::transport::Tcp>() {
            Some(crate::transport::Tcp::Reactor(s)) => Some(s),
            _ => None,
        }
    });
    if let Some(tcp) = tcp {
        let s = socket2::SockRef::from(tcp);
        let _ = s.set_keepalive(false);
        let _ = s.set_nodelay(true);
        #[cfg(target_os = "linux")]
        let _ = s.set_tcp_user_timeout(None);
    }
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
                        let ping = ControlMsg::decode(&buf);
                        if ping.kind != control::PING {
                            return;
                        }
                        let pong = ControlMsg { kind: control::PONG, outcome: 0, ..ping };
                        if io.write_all(&pong.encode()).await.is_err() {
                            return;
                        }
                    }
                }
            }
            Some((index, outcome, idle_us)) = reports.recv() => {
                let m = ControlMsg { kind: control::REPORT, outcome, index, value: idle_us };
                if io.write_all(&m.encode()).await.is_err() {
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
