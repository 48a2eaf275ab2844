//! `tether probe`: measuring a path's idle timeout (how long a NAT, load balancer or firewall
//! keeps an idle TCP flow) in not much more wall time than the timeout itself.
//!
//! The responder half ([`respond`]) runs inside [`Server`](crate::Server) for connections
//! whose first frame is PROBE; the client half is [`run`]. The pure parts live in the core:
//! the bytes in [`tether_proto::wire::probe`] (re-exported here), the schedule and the
//! bracketing logic in [`tether_proto::probe_ladder`] (re-exported as [`ladder`]). The
//! exchange is documented in `docs/PROBE.md`.
//!
//! ```text
//!  client                                         responder (tether serve)
//!   │ "TTHR" 1, PROBE{v1, mode, session, index, delay_ms, grace_ms}  ─▶
//!   │ ◀─  "TTHR" 1, PROBE{v1, mode, session, index}     (or REFUSE)
//!   │                    … raw bytes from here on, no heartbeats …
//!   │ control:      PING(n) every grace/2 ─▶ ◀─ PONG(n);  ◀─ REPORT(index, outcome, idle)
//!   │ client-first: idle delay, 'T' ─▶ ◀─ 'E'       (no 'E' within grace: expired)
//!   │ server-first: ◀─ 'S' after delay idle, 'A' ─▶  (responder REPORTs what it saw)
//! ```

pub mod client;
mod conns;
mod responder;

use std::time::Duration;

pub use client::{run, ProbeConfig, ProbeError, ProbeReport, Progress};
pub use ladder::{Direction, DirectionResult, Expiry, Outcome};
pub use responder::respond;
pub use tether_proto::probe_ladder as ladder;
pub use tether_proto::wire::probe::{
    control, report, ControlMsg, Mode, Request, RequestError, ACK_BYTE, ANSWER_LEN,
    CONTROL_MSG_LEN, ECHO_BYTE, MAX_DELAY, MAX_GRACE, PROBE_VERSION, REQUEST_LEN, SERVER_BYTE,
    TEST_BYTE,
};

/// A control connection that hears nothing for this long is closed by the responder.
pub const CONTROL_IDLE_LIMIT: Duration = Duration::from_secs(30);

fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
    )
}

/// Seconds with two decimals, for messages.
pub(crate) fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}
