//! [`relay`]: one proxied connection's two legs, copied both ways until the first fault
//! ends both (or both directions close in order), with the error watches and the timers
//! (idle, half-close); and the classification of the error that ended a leg.

use std::future::Future;
use std::io;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::Poll;
use std::time::Duration;

use tether_proto::DisconnectReason;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::copy::{CopyMode, OneWay};
use super::metrics::Counters;
use super::Leg;
use crate::sockopt;

/// Options of [`relay`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RelayOptions {
    /// No byte in either direction for this long ends the connection with RST on both legs.
    /// `None` disables. Default: `None`.
    pub idle_timeout: Option<Duration>,
    /// Once one side has half-closed (sent FIN), the other direction moving no byte for this
    /// long ends the connection with RST on both legs (`half-close-timeout`): a peer that
    /// never closes its side must not hold both sockets forever. `None` disables.
    /// Default: `None` (the proxy's own default is in [`ProxyConfig`](super::ProxyConfig)).
    pub half_close_timeout: Option<Duration>,
    /// How bytes are moved. Default: [`CopyMode::default`].
    pub copy: CopyMode,
}

/// How a relayed connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayEnd {
    /// Why it ended: `peer-closed` (both directions closed by FIN) or a failure.
    pub reason: DisconnectReason,
    /// The leg whose event ended it (for `peer-closed`, the leg that closed *last*; for
    /// `half-close-timeout`, the leg that never closed); `None` for `idle-timeout`, which
    /// concerns both.
    pub leg: Option<Leg>,
    /// For `peer-closed` and `half-close-timeout`: the leg that sent the first FIN.
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

/// Relays bytes between `client` and `upstream` until the connection ends, closes both legs
/// (RST on both when the cause was a failure) and reports how it ended. Socket options are
/// the caller's business (see [`sockopt::apply`]).
pub async fn relay(client: TcpStream, upstream: TcpStream, opts: &RelayOptions) -> RelayEnd {
    relay_counted(client, upstream, opts, None).await
}

/// Why a pump or watch stopped with a fault.
pub(super) struct Fault {
    pub(super) leg: Leg,
    pub(super) error: io::Error,
}

/// What one select round of the relay produced.
enum Step {
    /// A direction finished in order (its source sent FIN, forwarded).
    DirectionDone(Leg),
    Fault(Fault),
    IdleCheck,
    HalfCloseCheck,
}

pub(super) async fn relay_counted(
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
        let up = OneWay {
            src: &client,
            dst: &upstream,
            src_leg: Leg::Client,
            moved: &up_bytes,
            global: g_up,
            channels: g_channels,
            activity: &activity,
            mode: opts.copy,
        };
        let down = OneWay {
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
        let half = opts.half_close_timeout;
        // Armed at the first FIN.
        let mut half_since: Option<Instant> = None;
        let mut half_sleep = pin!(tokio::time::sleep_until(start));
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
                if half.is_some() && half_since.is_some() && half_sleep.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Step::HalfCloseCheck);
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
                    if let Some(limit) = half {
                        let now = Instant::now();
                        half_since = Some(now);
                        half_sleep.as_mut().reset(now + limit);
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
                Step::HalfCloseCheck => {
                    // Lazy as well: bytes of the open direction push the deadline.
                    let limit = half.unwrap_or_default();
                    let since = half_since.unwrap_or(start).max(activity.last());
                    let deadline = since + limit;
                    if Instant::now() >= deadline {
                        let open = if up_done { Leg::Upstream } else { Leg::Client };
                        break (DisconnectReason::HalfCloseTimeout, Some(open), true);
                    }
                    half_sleep.as_mut().reset(deadline);
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
    let first_fin = match reason {
        DisconnectReason::PeerClosed | DisconnectReason::HalfCloseTimeout => first_fin,
        _ => None,
    };
    RelayEnd {
        reason,
        leg,
        first_fin,
        abortive: failure,
        bytes_up: up_bytes.load(Relaxed),
        bytes_down: down_bytes.load(Relaxed),
        duration: start.elapsed(),
    }
}

/// When the connection last moved a byte, as milliseconds since `start` (lock-free, shared by
/// both directions of one connection).
pub(super) struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub(super) fn touch(&self) {
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
}
