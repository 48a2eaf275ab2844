//! Liveness policy: what the user knows (how fast a dead peer must be detected, and
//! optionally the idle timeout of the path) turned into concrete timer and socket settings.
//!
//! OWNED BY THE POLICY HELPER: derivation, invariants and tests are filled in there.

use std::time::Duration;

/// TCP keepalive settings applied per socket (`SO_KEEPALIVE`, `TCP_KEEPIDLE`,
/// `TCP_KEEPINTVL`, `TCP_KEEPCNT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe (`TCP_KEEPIDLE`).
    pub idle: Duration,
    /// Time between unanswered probes (`TCP_KEEPINTVL`).
    pub interval: Duration,
    /// Unanswered probes before the kernel gives up (`TCP_KEEPCNT`).
    pub count: u32,
}

/// The concrete liveness settings for one connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// A side that has sent nothing for this long sends a heartbeat (an empty frame).
    pub heartbeat_interval: Duration,
    /// A side that has received nothing at all for this long declares the peer dead.
    pub dead_after: Duration,
    /// No application data (either direction) for this long closes the connection.
    /// `None` disables. Default: `None`.
    pub idle_timeout: Option<Duration>,
    /// Per-socket TCP keepalive. `None` leaves the OS default (off).
    pub keepalive: Option<Keepalive>,
    /// `TCP_USER_TIMEOUT` (Linux): unacknowledged data for this long aborts the connection.
    pub user_timeout: Option<Duration>,
    /// Send a PING for RTT measurement this often. `None` disables.
    pub ping_interval: Option<Duration>,
}
