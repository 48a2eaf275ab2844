//! Why a connection ended, and the close codes carried in CLOSE and REFUSE frames.
//!
//! Every disconnect tether reports carries a [`DisconnectReason`] and how long the peer had
//! been silent. The names follow `docs/PROTOCOL.md` §"Close codes".

use std::fmt;

/// Close and refusal codes carried on the wire (u16, big-endian).
///
/// Codes 0–999 are defined by the protocol; 1000–65535 are for applications.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// Orderly close, nothing wrong.
    pub const NORMAL: CloseCode = CloseCode(0);
    /// The sender is shutting down (server restart, process exit).
    pub const GOING_AWAY: CloseCode = CloseCode(1);
    /// The sender saw a protocol violation.
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(2);
    /// The sender declared the peer dead (no bytes for `dead_after`).
    pub const HEARTBEAT_TIMEOUT: CloseCode = CloseCode(3);
    /// No application data for `idle_timeout`.
    pub const IDLE_TIMEOUT: CloseCode = CloseCode(4);
    /// A newer connection with the same client id replaced this one.
    pub const REPLACED: CloseCode = CloseCode(5);
    /// The peer sent heartbeats or pings far more often than agreed.
    pub const POLICY_VIOLATION: CloseCode = CloseCode(6);
    /// The peer's credential expired and was not refreshed in time (or a refresh was
    /// refused).
    pub const CREDENTIAL_EXPIRED: CloseCode = CloseCode(7);
    /// The peer did not read: the bytes queued for it passed the sender's bound.
    pub const SLOW_CONSUMER: CloseCode = CloseCode(8);
    /// Refusal: the server is at its connection limit.
    pub const SERVER_FULL: CloseCode = CloseCode(10);
    /// Refusal: the hello was malformed or the client id is not acceptable.
    pub const BAD_HELLO: CloseCode = CloseCode(11);
    /// Refusal: the requested protocol version is not supported.
    pub const UNSUPPORTED_VERSION: CloseCode = CloseCode(12);
    /// Refusal: the hello did not arrive within the handshake deadline.
    pub const HANDSHAKE_TIMEOUT: CloseCode = CloseCode(13);
    /// Refusal: the resume token is unknown, expired or wrong.
    pub const SESSION_UNKNOWN: CloseCode = CloseCode(14);
    /// Refusal or close: the server refuses for an application reason.
    pub const REFUSED: CloseCode = CloseCode(15);
    /// Refusal: the session is still attached to the previous connection, which the server
    /// is now closing; retry the resume shortly.
    pub const SESSION_BUSY: CloseCode = CloseCode(16);
    /// Refusal: no credential, or the credential is invalid or expired.
    pub const UNAUTHORIZED: CloseCode = CloseCode(17);
    /// Refusal: the credential is valid but does not allow this client id (or this
    /// principal may not replace or resume the id's connection or session).
    pub const ID_NOT_ALLOWED: CloseCode = CloseCode(18);
    /// Refusal: too many failed attempts from this address; retry after a backoff.
    pub const THROTTLED: CloseCode = CloseCode(19);
    /// First code available to applications.
    pub const APPLICATION_MIN: CloseCode = CloseCode(1000);

    /// A short lowercase name for logs and metrics (`"normal"`, `"protocol-error"`, or the number).
    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "normal",
            1 => "going-away",
            2 => "protocol-error",
            3 => "heartbeat-timeout",
            4 => "idle-timeout",
            5 => "replaced",
            6 => "policy-violation",
            7 => "credential-expired",
            8 => "slow-consumer",
            10 => "server-full",
            11 => "bad-hello",
            12 => "unsupported-version",
            13 => "handshake-timeout",
            14 => "session-unknown",
            15 => "refused",
            16 => "session-busy",
            17 => "unauthorized",
            18 => "id-not-allowed",
            19 => "throttled",
            1000.. => "application",
            _ => "unknown",
        }
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.0, self.name())
    }
}

/// Why a connection ended. Reported with every disconnect, together with how long the peer
/// had been silent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// The peer closed its side in order (FIN) without a CLOSE frame.
    PeerClosed,
    /// The peer, or a middlebox on its behalf, reset the connection (RST).
    PeerReset,
    /// Nothing at all was received for `dead_after`: the peer is presumed dead.
    HeartbeatTimeout,
    /// The kernel gave up after unanswered TCP keepalive probes (ETIMEDOUT while idle).
    KeepaliveTimeout,
    /// Sent data stayed unacknowledged for `TCP_USER_TIMEOUT` (ETIMEDOUT with data in flight).
    UserTimeout,
    /// No application data for `idle_timeout`.
    IdleTimeout,
    /// The peer broke the protocol; the text says how.
    ProtocolError(String),
    /// The server refused the connection (refusal frame).
    Refused {
        /// The refusal code.
        code: CloseCode,
        /// The server's explanation.
        text: String,
    },
    /// A newer connection with the same client id replaced this one.
    Replaced,
    /// This side closed the connection.
    LocalClose,
    /// The peer closed with a CLOSE frame.
    PeerClose {
        /// The code from the CLOSE frame.
        code: CloseCode,
        /// The text from the CLOSE frame.
        text: String,
    },
    /// Any other transport error (the `io::ErrorKind` name and message).
    Io(String),
    /// The peer did not read what was sent to it: its unsent bytes passed the bound
    /// (CLOSE code 8).
    SlowConsumer,
    /// The peer sent heartbeats or pings far more often than agreed (CLOSE code 6).
    PolicyViolation,
    /// Nothing listens at the address (the TCP connect was refused).
    ConnectRefused,
    /// The peer's credential expired and was not refreshed in time (CLOSE code 7).
    CredentialExpired,
    /// A half-closed connection (one side sent FIN) moved no byte in the other direction
    /// for the half-close timeout (`tether proxy`).
    HalfCloseTimeout,
}

impl DisconnectReason {
    /// A stable kebab-case label for metrics and JSON (`"heartbeat-timeout"`, …).
    pub fn label(&self) -> &'static str {
        match self {
            DisconnectReason::PeerClosed => "peer-closed",
            DisconnectReason::PeerReset => "peer-reset",
            DisconnectReason::HeartbeatTimeout => "heartbeat-timeout",
            DisconnectReason::KeepaliveTimeout => "keepalive-timeout",
            DisconnectReason::UserTimeout => "user-timeout",
            DisconnectReason::IdleTimeout => "idle-timeout",
            DisconnectReason::ProtocolError(_) => "protocol-error",
            DisconnectReason::Refused { .. } => "refused",
            DisconnectReason::Replaced => "replaced",
            DisconnectReason::LocalClose => "local-close",
            DisconnectReason::PeerClose { .. } => "peer-close",
            DisconnectReason::Io(_) => "io-error",
            DisconnectReason::SlowConsumer => "slow-consumer",
            DisconnectReason::PolicyViolation => "policy-violation",
            DisconnectReason::ConnectRefused => "connect-refused",
            DisconnectReason::CredentialExpired => "credential-expired",
            DisconnectReason::HalfCloseTimeout => "half-close-timeout",
        }
    }

    /// The reason for a failed transport operation (connect, read, write). This is the one
    /// mapping from `std::io::Error` (via [`TransportError::from_io`](crate::TransportError::from_io),
    /// which also tells a user timeout from a keepalive timeout when the caller knows whether
    /// data was in flight): refused → `connect-refused`, reset/broken pipe → `peer-reset`,
    /// timed out → `keepalive-timeout`, anything else → `io-error`.
    pub fn from_io_error(e: &std::io::Error) -> Self {
        crate::conn::TransportError::from_io(e, || false).reason()
    }

    /// All labels, in a fixed order (for metrics that must list every reason).
    pub const LABELS: [&'static str; 17] = [
        "peer-closed",
        "peer-reset",
        "heartbeat-timeout",
        "keepalive-timeout",
        "user-timeout",
        "idle-timeout",
        "protocol-error",
        "refused",
        "replaced",
        "local-close",
        "peer-close",
        "io-error",
        "slow-consumer",
        "policy-violation",
        "connect-refused",
        "credential-expired",
        "half-close-timeout",
    ];

    /// True when the connection ended because something failed (as opposed to an orderly
    /// close by either side). Proxies use this to choose RST over FIN.
    pub fn is_failure(&self) -> bool {
        !matches!(
            self,
            DisconnectReason::PeerClosed
                | DisconnectReason::LocalClose
                | DisconnectReason::PeerClose {
                    code: CloseCode::NORMAL,
                    ..
                }
                | DisconnectReason::PeerClose {
                    code: CloseCode::GOING_AWAY,
                    ..
                }
        )
    }
}

impl fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DisconnectReason::ProtocolError(t) => write!(f, "protocol-error: {t}"),
            DisconnectReason::Refused { code, text } => write!(f, "refused {code}: {text}"),
            DisconnectReason::PeerClose { code, text } if text.is_empty() => {
                write!(f, "peer-close {code}")
            }
            DisconnectReason::PeerClose { code, text } => write!(f, "peer-close {code}: {text}"),
            DisconnectReason::Io(t) => write!(f, "io-error: {t}"),
            other => f.write_str(other.label()),
        }
    }
}
