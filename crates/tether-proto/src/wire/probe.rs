//! The bytes of the probe exchange (`docs/PROBE.md`): the PROBE request and answer bodies
//! carried in a PROBE frame (type `0x20`, see [`crate::codec::Frame::Probe`]), the 16-byte
//! control messages, and the single test bytes that follow the answer.
//!
//! ```text
//!  request  version:u8 mode:u8 session:u64 index:u32 delay_ms:u32 grace_ms:u32   22 bytes
//!  answer   version:u8 mode:u8 session:u64 index:u32                            14 bytes
//!  control  kind:u8 outcome:u8 reserved:u16 index:u32 value:u64                 16 bytes
//!           (all big-endian; trailing bytes of a request are ignored)
//! ```
//!
//! The driver (the responder inside `tether::Server` and the client that runs the ladder) is
//! `tether::probe`; the schedule is [`crate::probe_ladder`].

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

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
    /// Responder → client: the outcome of server-first connection `index` (`outcome` byte),
    /// `value` the idle period the responder tested, in microseconds.
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
    /// The mode's byte on the wire (1, 2, 3).
    pub fn byte(self) -> u8 {
        match self {
            Mode::Control => 1,
            Mode::ClientFirst => 2,
            Mode::ServerFirst => 3,
        }
    }

    /// The mode for a wire byte, if it is one.
    pub fn from_byte(b: u8) -> Option<Mode> {
        match b {
            1 => Some(Mode::Control),
            2 => Some(Mode::ClientFirst),
            3 => Some(Mode::ServerFirst),
            _ => None,
        }
    }
}

/// The body of a PROBE request.
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
    /// Encodes the body (without the frame type byte). Durations are sent in whole
    /// milliseconds, saturating at `u32::MAX`.
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

/// One 16-byte control message (`kind` from [`control`], `outcome` from [`report`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ControlMsg {
    /// [`control::PING`], [`control::PONG`] or [`control::REPORT`] (others are a protocol
    /// error for the receiver to handle).
    pub kind: u8,
    /// A REPORT's outcome byte; 0 otherwise.
    pub outcome: u8,
    /// A REPORT's connection index; 0 otherwise.
    pub index: u32,
    /// PING/PONG sequence number, or a REPORT's tested idle period in µs.
    pub value: u64,
}

impl ControlMsg {
    /// A PING (or, with `kind` PONG, its answer) carrying `seq`.
    pub fn ping(kind: u8, seq: u64) -> ControlMsg {
        ControlMsg {
            kind,
            outcome: 0,
            index: 0,
            value: seq,
        }
    }

    /// The 16 bytes on the wire (the reserved field is zero).
    pub fn encode(&self) -> [u8; CONTROL_MSG_LEN] {
        let mut m = [0u8; CONTROL_MSG_LEN];
        m[0] = self.kind;
        m[1] = self.outcome;
        m[4..8].copy_from_slice(&self.index.to_be_bytes());
        m[8..16].copy_from_slice(&self.value.to_be_bytes());
        m
    }

    /// Decodes 16 bytes (the reserved field is ignored). Every input decodes; whether the
    /// kind is acceptable is the receiver's call.
    pub fn decode(m: &[u8; CONTROL_MSG_LEN]) -> ControlMsg {
        let mut v = [0u8; 8];
        v.copy_from_slice(&m[8..16]);
        ControlMsg {
            kind: m[0],
            outcome: m[1],
            index: u32::from_be_bytes([m[4], m[5], m[6], m[7]]),
            value: u64::from_be_bytes(v),
        }
    }
}
