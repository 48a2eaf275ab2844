//! The messages of `tether tunnel` (`docs/TUNNEL.md`): every tether message of a tunnel
//! session carries exactly one of them, a kind byte and a body.
//!
//! ```text
//!  kind  name    direction     body
//!  0x01  OPEN    entry → exit  u8 version (1): open a connection to the target
//!  0x02  DATA    both          1.. bytes of the application stream (one read, ≤ 256 KiB)
//!  0x03  FIN     both          —  the sender's application half-closed: no more DATA
//!  0x04  ABORT   both          UTF-8 reason: the sender's application connection failed
//!                              (reset, error, target unreachable): reset yours
//!  0x05  WINDOW  both          u32 BE n: I wrote n more of your bytes to my application
//!  0x06  DONE    exit → entry  —  both directions finished; the entry closes the session
//! ```
//!
//! Which message may come when (credit, FIN before DONE, …) is the tunnel's business
//! (`tether::tunnel`); this module only turns messages into bytes and back, and rejects a
//! malformed message with a [`TunnelMsgError`] instead of panicking.

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

/// Tunnel protocol version carried in OPEN.
pub const VERSION: u8 = 1;

/// The kind bytes.
pub mod kind {
    /// OPEN: open a connection to the target (body: version).
    pub const OPEN: u8 = 0x01;
    /// DATA: application bytes.
    pub const DATA: u8 = 0x02;
    /// FIN: the sender's application half-closed.
    pub const FIN: u8 = 0x03;
    /// ABORT: the sender's application connection failed (body: reason).
    pub const ABORT: u8 = 0x04;
    /// WINDOW: credit returned (body: u32 BE).
    pub const WINDOW: u8 = 0x05;
    /// DONE: both directions finished (exit → entry).
    pub const DONE: u8 = 0x06;
}

/// One tunnel message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// Open a connection to the target, speaking this tunnel version.
    Open(u8),
    /// Bytes of the application stream (never empty).
    Data(Bytes),
    /// The sender's application half-closed.
    Fin,
    /// The sender's application connection failed; the text says why.
    Abort(String),
    /// The sender wrote this many more of the receiver's bytes to its application.
    Window(u32),
    /// Both directions finished.
    Done,
}

/// Why bytes are not a tunnel message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TunnelMsgError {
    /// No kind byte.
    #[error("empty tunnel message")]
    Empty,
    /// A DATA message without data.
    #[error("empty DATA")]
    EmptyData,
    /// A fixed-size body of the wrong size.
    #[error("tunnel message {kind:#04x} has {len} body bytes, expected {expected}")]
    Length {
        /// The kind byte.
        kind: u8,
        /// Body bytes received.
        len: usize,
        /// Body bytes this kind has.
        expected: usize,
    },
    /// A kind this implementation does not know.
    #[error("unknown tunnel message kind {0:#04x}")]
    UnknownKind(u8),
}

impl Msg {
    /// The kind byte.
    pub fn kind(&self) -> u8 {
        match self {
            Msg::Open(_) => kind::OPEN,
            Msg::Data(_) => kind::DATA,
            Msg::Fin => kind::FIN,
            Msg::Abort(_) => kind::ABORT,
            Msg::Window(_) => kind::WINDOW,
            Msg::Done => kind::DONE,
        }
    }

    /// The message as one tether message body. (A DATA message built here copies its
    /// payload; a reader that owns a buffer can instead put [`kind::DATA`] in front of the
    /// bytes it read, which is the same encoding.)
    pub fn encode(&self) -> Bytes {
        let body: &[u8] = match self {
            Msg::Open(v) => std::slice::from_ref(v),
            Msg::Data(d) => d,
            Msg::Abort(s) => s.as_bytes(),
            Msg::Fin | Msg::Done => &[],
            Msg::Window(n) => return with_kind(kind::WINDOW, &n.to_be_bytes()),
        };
        with_kind(self.kind(), body)
    }

    /// Decodes one tether message body. The DATA payload is a slice of `m` (no copy); an
    /// ABORT reason that is not UTF-8 is decoded lossily (it is only ever displayed).
    pub fn decode(m: &Bytes) -> Result<Msg, TunnelMsgError> {
        let Some(&k) = m.first() else {
            return Err(TunnelMsgError::Empty);
        };
        let body = m.slice(1..);
        let exact = |expected: usize| {
            if body.len() == expected {
                Ok(())
            } else {
                Err(TunnelMsgError::Length {
                    kind: k,
                    len: body.len(),
                    expected,
                })
            }
        };
        match k {
            kind::OPEN => exact(1).map(|()| Msg::Open(body[0])),
            kind::DATA if body.is_empty() => Err(TunnelMsgError::EmptyData),
            kind::DATA => Ok(Msg::Data(body)),
            kind::FIN => exact(0).map(|()| Msg::Fin),
            kind::ABORT => Ok(Msg::Abort(String::from_utf8_lossy(&body).into_owned())),
            kind::WINDOW => exact(4)
                .map(|()| Msg::Window(u32::from_be_bytes([body[0], body[1], body[2], body[3]]))),
            kind::DONE => exact(0).map(|()| Msg::Done),
            other => Err(TunnelMsgError::UnknownKind(other)),
        }
    }
}

fn with_kind(k: u8, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(1 + body.len());
    b.put_u8(k);
    b.put_slice(body);
    b.freeze()
}
