//! The probe's connections: the control connection ([`run_control`]: pings, PONGs and
//! REPORTs) and one task per rung ([`run_rung`]: open, idle, test once), each reporting to
//! the coordinator in [`super::client::run`] through [`Event`]s.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tether_proto::codec::{self, Frame, HEADER_LEN, PREAMBLE_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::client::ProbeError;
use super::ladder::{Expiry, Outcome};
use super::{
    control, is_reset, ControlMsg, Mode, Request, ACK_BYTE, CONTROL_MSG_LEN, ECHO_BYTE,
    SERVER_BYTE, TEST_BYTE,
};

/// What the connection tasks tell the coordinator ([`super::client::run`]).
#[derive(Debug)]
pub(super) enum Event {
    Opened {
        dir: usize,
        rung: usize,
        since: Instant,
    },
    OpenFailed {
        dir: usize,
        rung: usize,
    },
    Tested {
        dir: usize,
        rung: usize,
        at: Instant,
        /// The idle period as measured: at least this long (what a surviving test counts
        /// for).
        age: Duration,
        /// At most this long (what an expired test counts for).
        age_max: Duration,
        outcome: Option<Outcome>,
    },
    Pong {
        sent: Instant,
    },
    Report {
        index: u32,
        outcome: u8,
        /// The responder's measured idle period before it spoke, in microseconds.
        idle_us: u64,
    },
    ControlLost(String),
}

pub(super) fn index_of(dir: usize, rung: usize) -> u32 {
    ((dir as u32) << 24) | (rung as u32 & 0x00ff_ffff)
}

/// Opens one probe connection: preamble + PROBE, then the answer (preamble + PROBE echo).
pub(super) async fn open(addr: SocketAddr, req: &Request) -> Result<TcpStream, ProbeError> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|source| ProbeError::Connect { addr, source })?;
    let _ = s.set_nodelay(true);
    let mut out = BytesMut::new();
    codec::encode_preamble(&mut out);
    codec::encode(&Frame::Probe(req.encode()), &mut out);
    let io_err = |source| ProbeError::Connect { addr, source };
    s.write_all(&out).await.map_err(io_err)?;
    let proto = |why: String| ProbeError::Protocol { addr, why };
    let mut pre = [0u8; PREAMBLE_LEN];
    s.read_exact(&mut pre).await.map_err(io_err)?;
    codec::check_preamble(&pre).map_err(|e| proto(e.to_string()))?;
    let mut hdr = [0u8; HEADER_LEN];
    s.read_exact(&mut hdr).await.map_err(io_err)?;
    let len = u32::from_be_bytes(hdr) as usize;
    if len == 0 || len > 2048 {
        return Err(proto(format!("answer frame of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.map_err(io_err)?;
    match codec::parse_body(&body).map_err(|e| proto(e.to_string()))? {
        Frame::Probe(b) if b[..] == req.answer()[..] => Ok(s),
        Frame::Probe(_) => Err(proto("probe answer does not match the request".into())),
        Frame::Refuse { text, .. } => Err(ProbeError::Refused { addr, text }),
        other => Err(proto(format!("unexpected answer {other:?}"))),
    }
}

fn abort(s: TcpStream) {
    let _ = crate::sockopt::set_abortive_close(&s);
    drop(s);
}

pub(super) struct RungJob {
    pub(super) addr: SocketAddr,
    pub(super) req: Request,
    pub(super) dir: usize,
    pub(super) rung: usize,
    pub(super) start_at: Instant,
    pub(super) connect_timeout: Duration,
    pub(super) tx: mpsc::UnboundedSender<Event>,
}

/// An upper bound of the kernel's tick: `TCP_INFO` gives the time since the last segment in
/// whole ticks (1 ms at HZ=1000, 4 ms at 250, 10 ms at 100).
const KERNEL_TICK: Duration = Duration::from_millis(10);

/// When the idle period of a freshly opened connection began, as `(earliest, latest)`. The
/// answer's arrival is the last traffic before it (the client's kernel acknowledges it at
/// once), and the task that read it at `read_at` may have waited for the CPU long after
/// that: under load, a client-first test timed from `read_at` idled 100 ms longer than it
/// counted, and expired rungs claimed a timeout below the true one. The kernel timestamped
/// the arrival (`tcpi_last_data_recv`, within a tick).
fn idle_start(s: &TcpStream, read_at: Instant) -> (Instant, Instant) {
    match crate::sockopt::tcp_info(s) {
        Some(i) => {
            let arrived = read_at.checked_sub(i.last_data_recv).unwrap_or(read_at);
            let earliest = arrived.checked_sub(KERNEL_TICK).unwrap_or(arrived);
            (earliest, read_at.min(arrived + KERNEL_TICK))
        }
        None => (read_at, read_at),
    }
}

pub(super) async fn run_rung(job: RungJob) {
    let RungJob {
        addr,
        req,
        dir,
        rung,
        start_at,
        connect_timeout,
        tx,
    } = job;
    tokio::time::sleep_until(start_at).await;
    let mut s = match tokio::time::timeout(connect_timeout, open(addr, &req)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(rung, error = %e, "probe connection failed");
            let _ = tx.send(Event::OpenFailed { dir, rung });
            return;
        }
        Err(_) => {
            let _ = tx.send(Event::OpenFailed { dir, rung });
            return;
        }
    };
    let read_at = Instant::now();
    let (earliest, since) = match req.mode {
        Mode::ClientFirst => idle_start(&s, read_at),
        Mode::ServerFirst | Mode::Control => (read_at, read_at),
    };
    let _ = tx.send(Event::Opened { dir, rung, since });
    let mut at = since + req.delay;
    let mut age = req.delay;
    let mut age_max = req.delay;
    let mut buf = [0u8; 16];
    let outcome = match req.mode {
        Mode::ClientFirst => {
            // Timed from the latest the idle period can have begun: it lasts at least
            // `delay`, and at most a kernel tick or two more.
            tokio::time::sleep_until(at).await;
            // A late wake-up tests a longer idle period: record what was tested.
            at = Instant::now();
            age = at.duration_since(since);
            age_max = at.duration_since(earliest);
            match s.write_all(&[TEST_BYTE]).await {
                Err(e) if is_reset(&e) => Some(Outcome::Expired(Expiry::Reset)),
                Err(_) => Some(Outcome::Expired(Expiry::Unknown)),
                Ok(()) => match tokio::time::timeout(req.grace, s.read(&mut buf)).await {
                    Ok(Ok(0)) => Some(Outcome::Expired(Expiry::Close)),
                    Ok(Ok(n)) if buf[..n].contains(&ECHO_BYTE) => Some(Outcome::Alive),
                    Ok(Ok(_)) => Some(Outcome::Expired(Expiry::Unknown)),
                    Ok(Err(e)) if is_reset(&e) => Some(Outcome::Expired(Expiry::Reset)),
                    Ok(Err(_)) => Some(Outcome::Expired(Expiry::Unknown)),
                    Err(_) => Some(Outcome::Expired(Expiry::SilentDrop)),
                },
            }
        }
        Mode::ServerFirst | Mode::Control => {
            match tokio::time::timeout_at(at + req.grace, s.read(&mut buf)).await {
                Ok(Ok(0)) => Some(Outcome::Expired(Expiry::Close)),
                Ok(Ok(n)) if buf[..n].contains(&SERVER_BYTE) => {
                    // Only a fallback: the responder timed this idle period (its REPORT).
                    age = since.elapsed();
                    age_max = age;
                    let _ = s.write_all(&[ACK_BYTE]).await;
                    Some(Outcome::Alive)
                }
                Ok(Ok(_)) => Some(Outcome::Expired(Expiry::Unknown)),
                Ok(Err(e)) if is_reset(&e) => Some(Outcome::Expired(Expiry::Reset)),
                Ok(Err(_)) => Some(Outcome::Expired(Expiry::Unknown)),
                // Nothing arrived: the responder's REPORT tells what it saw.
                Err(_) => None,
            }
        }
    };
    let _ = tx.send(Event::Tested {
        dir,
        rung,
        at,
        age,
        age_max,
        outcome,
    });
    match outcome {
        Some(Outcome::Alive) => {
            // Let the acknowledgement reach the responder before the FIN.
            let _ = s.shutdown().await;
            let _ = tokio::time::timeout(req.grace, s.read(&mut buf)).await;
        }
        None => {
            // Keep still until the responder has made up its mind: a close from this side
            // must not be what it observes.
            tokio::time::sleep(req.grace * 2).await;
            abort(s);
        }
        _ => abort(s),
    }
}

pub(super) async fn run_control(
    mut s: TcpStream,
    interval: Duration,
    outage_after: Duration,
    tx: mpsc::UnboundedSender<Event>,
) {
    let (mut rd, mut wr) = s.split();
    let mut sent: HashMap<u64, Instant> = HashMap::new();
    let mut seq: u64 = 0;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = [0u8; CONTROL_MSG_LEN];
    let mut got = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = Instant::now();
                if let Some(oldest) = sent.values().min() {
                    if now.duration_since(*oldest) > outage_after {
                        let _ = tx.send(Event::ControlLost(format!(
                            "the control connection went {} without an answer",
                            super::secs(now.duration_since(*oldest))
                        )));
                        return;
                    }
                }
                seq += 1;
                sent.insert(seq, now);
                if wr.write_all(&ControlMsg::ping(control::PING, seq).encode()).await.is_err() {
                    let _ = tx.send(Event::ControlLost("the control connection failed".into()));
                    return;
                }
            }
            r = rd.read(&mut buf[got..]) => {
                match r {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(Event::ControlLost("the control connection was closed".into()));
                        return;
                    }
                    Ok(n) => {
                        got += n;
                        if got < buf.len() {
                            continue;
                        }
                        got = 0;
                        let m = ControlMsg::decode(&buf);
                        match m.kind {
                            control::PONG => {
                                if let Some(t) = sent.remove(&m.value) {
                                    let _ = tx.send(Event::Pong { sent: t });
                                }
                            }
                            control::REPORT => {
                                let _ = tx.send(Event::Report { index: m.index, outcome: m.outcome, idle_us: m.value });
                            }
                            _ => {
                                let _ = tx.send(Event::ControlLost(format!("unknown control message {}", m.kind)));
                                return;
                            }
                        }
                    }
                }
            }
        }
    }
}
