//! Wire protocol v1: the preamble, frames, and an incremental decoder that checks every
//! length before it allocates.
//!
//! ```text
//! stream  = preamble *frame
//! preamble = "TTHR" version:u8                      (5 bytes, each side sends one)
//! frame   = length:u32be body:length bytes          (length 0 = HEARTBEAT, no body)
//! body    = type:u8 fields…
//!
//!  0        4        5
//!  +--------+--------+---------------- … ----+
//!  | length | type   | fields (length-1 B)   |
//!  +--------+--------+---------------- … ----+
//! ```
//!
//! See `docs/PROTOCOL.md` for every frame's fields. Types with the high bit set (`0x80..=0xFF`)
//! are extensions: a receiver that does not know one ignores it. An unknown type below `0x80`
//! is a protocol error.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::time::Duration;
use thiserror::Error;

use crate::reason::CloseCode;

/// The four magic bytes that open every tether stream.
pub const MAGIC: [u8; 4] = *b"TTHR";
/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Length of the preamble (`MAGIC` + version byte).
pub const PREAMBLE_LEN: usize = 5;
/// Length of the frame header (the big-endian `u32` length).
pub const HEADER_LEN: usize = 4;
/// Default maximum frame body length: 1 MiB.
pub const DEFAULT_MAX_FRAME_LEN: u32 = 1 << 20;
/// Longest client id accepted in a HELLO, in bytes.
pub const MAX_CLIENT_ID_LEN: usize = 255;
/// Longest text carried by CLOSE and REFUSE frames, in bytes (longer text is truncated when
/// encoding and refused when decoding).
pub const MAX_TEXT_LEN: usize = 1024;
/// Length of a session resume token, in bytes (128 bits).
pub const TOKEN_LEN: usize = 16;
/// Longest credential carried by HELLO (flag CREDENTIAL) and AUTH, in bytes. A credential
/// is never empty.
pub const MAX_CREDENTIAL_LEN: usize = 8192;

/// Frame type bytes (`docs/PROTOCOL.md` §"Frame types").
pub mod ty {
    /// Application message (unsequenced; connections without a session).
    pub const DATA: u8 = 0x01;
    /// RTT probe: nonce:u64.
    pub const PING: u8 = 0x02;
    /// RTT answer: the PING's nonce:u64.
    pub const PONG: u8 = 0x03;
    /// Orderly close with a reason: code:u16 text.
    pub const CLOSE: u8 = 0x04;
    /// Cumulative acknowledgement of sequenced data: seq:u64.
    pub const ACK: u8 = 0x05;
    /// Application message with a sequence number: seq:u64 payload (session connections).
    pub const SEQ_DATA: u8 = 0x06;
    /// Credential refresh (client → server): the new credential, 1..=8192 bytes.
    pub const AUTH: u8 = 0x07;
    /// Credential refresh accepted (server → client): credential_ttl_ms:u32, 0 = no expiry.
    pub const AUTH_OK: u8 = 0x08;
    /// Client hello (first frame a client sends).
    pub const HELLO: u8 = 0x10;
    /// Server welcome (answer to HELLO).
    pub const WELCOME: u8 = 0x11;
    /// Server refusal (answer to HELLO): code:u16 text.
    pub const REFUSE: u8 = 0x12;
    /// Probe request (first frame of a `tether probe` connection).
    pub const PROBE: u8 = 0x20;
    /// First extension type: types from here up are ignored when unknown.
    pub const EXTENSION_MIN: u8 = 0x80;
}

/// HELLO flag: the client asks for a resumable session.
pub const HELLO_SESSION: u8 = 0x01;
/// HELLO flag: the hello carries a resume request (session id, token, last received seq).
pub const HELLO_RESUME: u8 = 0x02;
/// HELLO flag: the hello carries a credential (`cred_len:u16` + credential) after the client
/// id and the optional resume block.
pub const HELLO_CREDENTIAL: u8 = 0x04;
/// WELCOME flag: a session is granted; the welcome carries its id and token.
pub const WELCOME_SESSION: u8 = 0x01;
/// WELCOME flag: the requested session was resumed.
pub const WELCOME_RESUMED: u8 = 0x02;
/// WELCOME flag: the welcome carries `credential_ttl_ms:u32` after the optional session block.
pub const WELCOME_CREDENTIAL_TTL: u8 = 0x04;

/// A credential carried by HELLO (flag CREDENTIAL) or AUTH: opaque bytes (a compact JWT in
/// practice). A secret: its `Debug` shows only its length, so a logged `Hello` or `Frame`
/// never carries it.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential(pub Bytes);

impl Credential {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential(<{} bytes>)", self.0.len())
    }
}

impl std::ops::Deref for Credential {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Bytes> for Credential {
    fn from(b: Bytes) -> Self {
        Credential(b)
    }
}

impl From<&'static [u8]> for Credential {
    fn from(b: &'static [u8]) -> Self {
        Credential(Bytes::from_static(b))
    }
}

impl From<Vec<u8>> for Credential {
    fn from(b: Vec<u8>) -> Self {
        Credential(Bytes::from(b))
    }
}

impl From<String> for Credential {
    fn from(s: String) -> Self {
        Credential(Bytes::from(s))
    }
}

/// Shows a secret token as its length only.
struct Redacted;

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A resume request inside a HELLO. `Debug` does not show the token.
#[derive(Clone, PartialEq, Eq)]
pub struct ResumeRequest {
    /// The session id from the original welcome.
    pub session_id: u64,
    /// The secret resume token from the original welcome.
    pub token: [u8; TOKEN_LEN],
    /// The highest sequence number the client has received (0 = none).
    pub last_received: u64,
}

impl std::fmt::Debug for ResumeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResumeRequest")
            .field("session_id", &self.session_id)
            .field("token", &Redacted)
            .field("last_received", &self.last_received)
            .finish()
    }
}

/// The client's first frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Who the client says it is (1–255 bytes of UTF-8).
    pub client_id: String,
    /// The heartbeat interval the client would like; zero means no preference.
    pub requested_heartbeat: Duration,
    /// The client asks for a resumable session.
    pub want_session: bool,
    /// Present when the client resumes an earlier session.
    pub resume: Option<ResumeRequest>,
    /// The client's credential (flag CREDENTIAL): opaque to the protocol, a compact JWT in
    /// practice; 1..=[`MAX_CREDENTIAL_LEN`] bytes. Its `Debug` shows only its length.
    pub credential: Option<Credential>,
}

/// Session parameters granted in a WELCOME. `Debug` does not show the token.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionGrant {
    /// Session id (not secret; for lookups and logs).
    pub session_id: u64,
    /// The secret resume token.
    pub token: [u8; TOKEN_LEN],
    /// True when an existing session was resumed.
    pub resumed: bool,
    /// The highest sequence number the server has received in this session (0 = none).
    pub last_received: u64,
    /// How long the server keeps the session after a disconnect.
    pub linger: Duration,
}

impl std::fmt::Debug for SessionGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionGrant")
            .field("session_id", &self.session_id)
            .field("token", &Redacted)
            .field("resumed", &self.resumed)
            .field("last_received", &self.last_received)
            .field("linger", &self.linger)
            .finish()
    }
}

/// The server's answer to an accepted HELLO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The heartbeat interval the client must use.
    pub heartbeat: Duration,
    /// How long the server waits for any byte before it declares the client dead.
    pub dead_after: Duration,
    /// Session parameters, when the client asked for one and the server grants it.
    pub session: Option<SessionGrant>,
    /// How long the client's credential stays valid (flag CREDENTIAL_TTL): the server closes
    /// the connection with CLOSE(CREDENTIAL_EXPIRED) when it runs out unless the client
    /// refreshed it with AUTH. `Some(Duration::ZERO)` means the credential does not expire;
    /// `None` means the welcome does not carry the field (no credential was negotiated).
    pub credential_ttl: Option<Duration>,
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// An empty frame (length 0): liveness only.
    Heartbeat,
    /// An application message.
    Data(Bytes),
    /// A sequenced application message (session connections).
    SeqData {
        /// Sequence number, starting at 1.
        seq: u64,
        /// The message.
        payload: Bytes,
    },
    /// RTT probe.
    Ping(u64),
    /// RTT answer.
    Pong(u64),
    /// Orderly close with a reason.
    Close {
        /// Why.
        code: CloseCode,
        /// Human-readable detail.
        text: String,
    },
    /// Cumulative acknowledgement: every sequence number up to and including this one arrived.
    Ack(u64),
    /// Credential refresh (client → server): the new credential (`Debug` shows only its
    /// length).
    Auth(Credential),
    /// Credential refresh accepted (server → client): the new credential's time to live;
    /// `Duration::ZERO` means it does not expire.
    AuthOk(Duration),
    /// Client hello.
    Hello(Hello),
    /// Server welcome.
    Welcome(Welcome),
    /// Server refusal.
    Refuse {
        /// Why.
        code: CloseCode,
        /// Human-readable detail.
        text: String,
    },
    /// Probe request; the body after the type byte is handed to the probe responder.
    Probe(Bytes),
    /// An extension frame this implementation does not know (type ≥ 0x80); ignore it.
    Extension(u8),
}

/// Why bytes could not be decoded. Every variant closes the connection with a
/// protocol-error reason.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The stream did not start with `TTHR`.
    #[error("bad magic {found:02x?}, expected \"TTHR\"")]
    BadMagic {
        /// The four bytes received instead.
        found: [u8; 4],
    },
    /// The peer speaks a version this implementation does not.
    #[error("unsupported protocol version {found}, this side speaks {VERSION}")]
    UnsupportedVersion {
        /// The version byte received.
        found: u8,
    },
    /// A frame announced a body longer than the configured maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    Oversize {
        /// Announced length.
        len: u32,
        /// Configured maximum.
        max: u32,
    },
    /// A frame type below 0x80 that this version does not define.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// A known frame type with fields that do not parse.
    #[error("malformed {frame} frame: {why}")]
    Malformed {
        /// Frame type name.
        frame: &'static str,
        /// What was wrong.
        why: &'static str,
    },
}

/// Writes the 5-byte preamble.
pub fn encode_preamble(out: &mut BytesMut) {
    out.put_slice(&MAGIC);
    out.put_u8(VERSION);
}

/// Checks a 5-byte preamble.
pub fn check_preamble(p: &[u8; PREAMBLE_LEN]) -> Result<(), DecodeError> {
    let magic = [p[0], p[1], p[2], p[3]];
    if magic != MAGIC {
        return Err(DecodeError::BadMagic { found: magic });
    }
    if p[4] != VERSION {
        return Err(DecodeError::UnsupportedVersion { found: p[4] });
    }
    Ok(())
}

fn millis_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// A credential time to live in wire milliseconds. `0` on the wire means "does not expire",
/// so a non-zero ttl below one millisecond is sent as 1 ms (never as "no expiry"); a ttl
/// beyond `u32::MAX` ms (~49.7 days) is sent as `u32::MAX` (the client refreshes early).
fn ttl_millis(d: Duration) -> u32 {
    if d.is_zero() {
        0
    } else {
        millis_u32(d).max(1)
    }
}

/// The credential bytes that fit on the wire (longer ones are cut; see [`encode`]).
fn wire_credential(c: &[u8]) -> &[u8] {
    &c[..c.len().min(MAX_CREDENTIAL_LEN)]
}

/// Why a credential cannot be carried by HELLO or AUTH.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CredentialLenError {
    /// A credential is never empty.
    #[error("credential is empty")]
    Empty,
    /// Longer than [`MAX_CREDENTIAL_LEN`].
    #[error("credential of {len} bytes exceeds the maximum of {max}")]
    TooLong {
        /// The credential's length.
        len: usize,
        /// [`MAX_CREDENTIAL_LEN`].
        max: usize,
    },
}

/// Checks that a credential fits HELLO and AUTH (1..=[`MAX_CREDENTIAL_LEN`] bytes). Callers
/// check at the edge (configuration), as they do for client ids: [`encode`] cannot fail.
pub fn check_credential(credential: &[u8]) -> Result<(), CredentialLenError> {
    match credential.len() {
        0 => Err(CredentialLenError::Empty),
        len if len > MAX_CREDENTIAL_LEN => Err(CredentialLenError::TooLong {
            len,
            max: MAX_CREDENTIAL_LEN,
        }),
        _ => Ok(()),
    }
}

fn truncate_text(text: &str) -> &str {
    if text.len() <= MAX_TEXT_LEN {
        return text;
    }
    let mut end = MAX_TEXT_LEN;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Appends one encoded frame (header included) to `out`.
///
/// Texts longer than [`MAX_TEXT_LEN`] are truncated at a character boundary; a client id
/// longer than [`MAX_CLIENT_ID_LEN`] is truncated likewise (callers validate ids first); a
/// credential longer than [`MAX_CREDENTIAL_LEN`] is cut there (callers check credentials with
/// [`check_credential`] first; an empty one is sent as given and the peer refuses it).
pub fn encode(frame: &Frame, out: &mut BytesMut) {
    fn with_len(out: &mut BytesMut, body: impl FnOnce(&mut BytesMut)) {
        let start = out.len();
        out.put_u32(0);
        body(out);
        let len = (out.len() - start - HEADER_LEN) as u32;
        out[start..start + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    }
    match frame {
        Frame::Heartbeat => out.put_u32(0),
        Frame::Data(p) => encode_data(p, out),
        Frame::SeqData { seq, payload } => encode_seq_data(*seq, payload, out),
        Frame::Ping(n) | Frame::Pong(n) => {
            let t = if matches!(frame, Frame::Ping(_)) {
                ty::PING
            } else {
                ty::PONG
            };
            out.put_u32(9);
            out.put_u8(t);
            out.put_u64(*n);
        }
        Frame::Ack(seq) => {
            out.put_u32(9);
            out.put_u8(ty::ACK);
            out.put_u64(*seq);
        }
        Frame::Auth(credential) => {
            let c = wire_credential(credential);
            out.put_u32(1 + c.len() as u32);
            out.put_u8(ty::AUTH);
            out.put_slice(c);
        }
        Frame::AuthOk(ttl) => {
            out.put_u32(5);
            out.put_u8(ty::AUTH_OK);
            out.put_u32(ttl_millis(*ttl));
        }
        Frame::Close { code, text } | Frame::Refuse { code, text } => {
            let t = if matches!(frame, Frame::Close { .. }) {
                ty::CLOSE
            } else {
                ty::REFUSE
            };
            let text = truncate_text(text);
            out.put_u32(3 + text.len() as u32);
            out.put_u8(t);
            out.put_u16(code.0);
            out.put_slice(text.as_bytes());
        }
        Frame::Hello(h) => with_len(out, |out| {
            out.put_u8(ty::HELLO);
            let mut flags = 0;
            if h.want_session {
                flags |= HELLO_SESSION;
            }
            if h.resume.is_some() {
                flags |= HELLO_RESUME;
            }
            if h.credential.is_some() {
                flags |= HELLO_CREDENTIAL;
            }
            out.put_u8(flags);
            out.put_u32(millis_u32(h.requested_heartbeat));
            let mut id_len = h.client_id.len().min(MAX_CLIENT_ID_LEN);
            while !h.client_id.is_char_boundary(id_len) {
                id_len -= 1;
            }
            out.put_u8(id_len as u8);
            out.put_slice(&h.client_id.as_bytes()[..id_len]);
            if let Some(r) = &h.resume {
                out.put_u64(r.session_id);
                out.put_slice(&r.token);
                out.put_u64(r.last_received);
            }
            if let Some(c) = &h.credential {
                let c = wire_credential(c);
                out.put_u16(c.len() as u16);
                out.put_slice(c);
            }
        }),
        Frame::Welcome(w) => with_len(out, |out| {
            out.put_u8(ty::WELCOME);
            let mut flags = 0;
            if let Some(s) = &w.session {
                flags |= WELCOME_SESSION;
                if s.resumed {
                    flags |= WELCOME_RESUMED;
                }
            }
            if w.credential_ttl.is_some() {
                flags |= WELCOME_CREDENTIAL_TTL;
            }
            out.put_u8(flags);
            out.put_u32(millis_u32(w.heartbeat));
            out.put_u32(millis_u32(w.dead_after));
            if let Some(s) = &w.session {
                out.put_u64(s.session_id);
                out.put_slice(&s.token);
                out.put_u64(s.last_received);
                out.put_u32(millis_u32(s.linger));
            }
            if let Some(ttl) = w.credential_ttl {
                out.put_u32(ttl_millis(ttl));
            }
        }),
        Frame::Probe(body) => {
            out.put_u32(1 + body.len() as u32);
            out.put_u8(ty::PROBE);
            out.put_slice(body);
        }
        Frame::Extension(t) => {
            out.put_u32(1);
            out.put_u8(*t);
        }
    }
}

/// Appends a DATA frame carrying `payload` (header included).
pub fn encode_data(payload: &[u8], out: &mut BytesMut) {
    out.reserve(HEADER_LEN + 1 + payload.len());
    encode_data_header(payload.len(), out);
    out.put_slice(payload);
}

/// Appends the header of a DATA frame whose `len`-byte payload follows it on the wire
/// (a transmit queue that sends the payload from where it is, not copied).
pub fn encode_data_header(len: usize, out: &mut BytesMut) {
    out.put_u32(1 + len as u32);
    out.put_u8(ty::DATA);
}

/// Appends a SEQ_DATA frame carrying `payload` with sequence number `seq`.
pub fn encode_seq_data(seq: u64, payload: &[u8], out: &mut BytesMut) {
    out.reserve(HEADER_LEN + 9 + payload.len());
    encode_seq_data_header(seq, payload.len(), out);
    out.put_slice(payload);
}

/// Appends the header of a SEQ_DATA frame with sequence number `seq` whose `len`-byte
/// payload follows it on the wire (see [`encode_data_header`]).
pub fn encode_seq_data_header(seq: u64, len: usize, out: &mut BytesMut) {
    out.put_u32(9 + len as u32);
    out.put_u8(ty::SEQ_DATA);
    out.put_u64(seq);
}

/// The encoded size of a DATA frame with a payload of `len` bytes.
pub const fn data_frame_len(len: usize) -> usize {
    HEADER_LEN + 1 + len
}

/// The encoded size of a SEQ_DATA frame with a payload of `len` bytes.
pub const fn seq_data_frame_len(len: usize) -> usize {
    HEADER_LEN + 9 + len
}

fn malformed(frame: &'static str, why: &'static str) -> DecodeError {
    DecodeError::Malformed { frame, why }
}

fn take_text(frame: &'static str, b: &[u8]) -> Result<String, DecodeError> {
    if b.len() > MAX_TEXT_LEN {
        return Err(malformed(frame, "text longer than 1024 bytes"));
    }
    String::from_utf8(b.to_vec()).map_err(|_| malformed(frame, "text is not UTF-8"))
}

/// The length of the complete frames at the start of `input` and how many there are. Stops
/// at a frame longer than `max` (the decoder reports it).
fn complete_prefix(input: &[u8], max: u32) -> (usize, usize) {
    let (mut at, mut count) = (0, 0);
    while let Some(h) = input.get(at..at + HEADER_LEN) {
        let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let total = HEADER_LEN + len as usize;
        if len > max || input.len() - at < total {
            break;
        }
        at += total;
        count += 1;
    }
    (at, count)
}

/// [`parse_body`] for the body at `block[start..end]` (never empty): DATA and SEQ_DATA
/// payloads are slices of `block`, not copies (they keep the block alive while they live).
fn parse_shared(block: &Bytes, start: usize, end: usize) -> Result<Frame, DecodeError> {
    let body = &block[start..end];
    match body[0] {
        ty::DATA => Ok(Frame::Data(block.slice(start + 1..end))),
        ty::SEQ_DATA if body.len() >= 9 => {
            let seq = u64::from_be_bytes([
                body[1], body[2], body[3], body[4], body[5], body[6], body[7], body[8],
            ]);
            Ok(Frame::SeqData {
                seq,
                payload: block.slice(start + 9..end),
            })
        }
        _ => parse_body(body),
    }
}

/// Parses one frame body (everything after the length prefix). `body` is never empty here:
/// an empty body is a heartbeat and handled by the caller.
pub fn parse_body(body: &[u8]) -> Result<Frame, DecodeError> {
    let (&t, mut rest) = body.split_first().ok_or(malformed("frame", "empty body"))?;
    match t {
        ty::DATA => Ok(Frame::Data(Bytes::copy_from_slice(rest))),
        ty::SEQ_DATA => {
            if rest.len() < 8 {
                return Err(malformed("SEQ_DATA", "shorter than its sequence number"));
            }
            let seq = rest.get_u64();
            Ok(Frame::SeqData {
                seq,
                payload: Bytes::copy_from_slice(rest),
            })
        }
        ty::PING | ty::PONG | ty::ACK => {
            let name = match t {
                ty::PING => "PING",
                ty::PONG => "PONG",
                _ => "ACK",
            };
            if rest.len() != 8 {
                return Err(malformed(
                    name,
                    "body must be exactly 8 bytes after the type",
                ));
            }
            let n = rest.get_u64();
            Ok(match t {
                ty::PING => Frame::Ping(n),
                ty::PONG => Frame::Pong(n),
                _ => Frame::Ack(n),
            })
        }
        ty::CLOSE | ty::REFUSE => {
            let name = if t == ty::CLOSE { "CLOSE" } else { "REFUSE" };
            if rest.len() < 2 {
                return Err(malformed(name, "missing code"));
            }
            let code = CloseCode(rest.get_u16());
            let text = take_text(name, rest)?;
            Ok(if t == ty::CLOSE {
                Frame::Close { code, text }
            } else {
                Frame::Refuse { code, text }
            })
        }
        ty::AUTH => {
            if rest.is_empty() {
                return Err(malformed("AUTH", "empty credential"));
            }
            if rest.len() > MAX_CREDENTIAL_LEN {
                return Err(malformed("AUTH", "credential longer than 8192 bytes"));
            }
            Ok(Frame::Auth(Credential(Bytes::copy_from_slice(rest))))
        }
        ty::AUTH_OK => {
            if rest.len() != 4 {
                return Err(malformed(
                    "AUTH_OK",
                    "body must be exactly 4 bytes after the type",
                ));
            }
            Ok(Frame::AuthOk(Duration::from_millis(u64::from(
                rest.get_u32(),
            ))))
        }
        ty::HELLO => parse_hello(rest).map(Frame::Hello),
        ty::WELCOME => parse_welcome(rest).map(Frame::Welcome),
        ty::PROBE => Ok(Frame::Probe(Bytes::copy_from_slice(rest))),
        t if t >= ty::EXTENSION_MIN => Ok(Frame::Extension(t)),
        t => Err(DecodeError::UnknownType(t)),
    }
}

fn parse_hello(mut b: &[u8]) -> Result<Hello, DecodeError> {
    const F: &str = "HELLO";
    if b.len() < 6 {
        return Err(malformed(F, "too short"));
    }
    let flags = b.get_u8();
    if flags & !(HELLO_SESSION | HELLO_RESUME | HELLO_CREDENTIAL) != 0 {
        return Err(malformed(F, "unknown flag bits"));
    }
    let requested_heartbeat = Duration::from_millis(u64::from(b.get_u32()));
    let id_len = usize::from(b.get_u8());
    if id_len == 0 {
        return Err(malformed(F, "empty client id"));
    }
    if b.len() < id_len {
        return Err(malformed(F, "client id runs past the frame"));
    }
    let client_id = String::from_utf8(b[..id_len].to_vec())
        .map_err(|_| malformed(F, "client id is not UTF-8"))?;
    b.advance(id_len);
    let resume = if flags & HELLO_RESUME != 0 {
        if b.len() < 8 + TOKEN_LEN + 8 {
            return Err(malformed(F, "resume fields must be 32 bytes"));
        }
        let session_id = b.get_u64();
        let mut token = [0u8; TOKEN_LEN];
        b.copy_to_slice(&mut token);
        let last_received = b.get_u64();
        Some(ResumeRequest {
            session_id,
            token,
            last_received,
        })
    } else {
        None
    };
    let credential = if flags & HELLO_CREDENTIAL != 0 {
        if b.len() < 2 {
            return Err(malformed(F, "credential flag without a credential length"));
        }
        let len = usize::from(b.get_u16());
        if len == 0 {
            return Err(malformed(F, "empty credential"));
        }
        if len > MAX_CREDENTIAL_LEN {
            return Err(malformed(F, "credential longer than 8192 bytes"));
        }
        if b.len() < len {
            return Err(malformed(F, "credential runs past the frame"));
        }
        let c = Bytes::copy_from_slice(&b[..len]);
        b.advance(len);
        Some(Credential(c))
    } else {
        None
    };
    if !b.is_empty() {
        return Err(malformed(F, "trailing bytes"));
    }
    Ok(Hello {
        client_id,
        requested_heartbeat,
        want_session: flags & HELLO_SESSION != 0 || resume.is_some(),
        resume,
        credential,
    })
}

fn parse_welcome(mut b: &[u8]) -> Result<Welcome, DecodeError> {
    const F: &str = "WELCOME";
    if b.len() < 9 {
        return Err(malformed(F, "too short"));
    }
    let flags = b.get_u8();
    if flags & !(WELCOME_SESSION | WELCOME_RESUMED | WELCOME_CREDENTIAL_TTL) != 0 {
        return Err(malformed(F, "unknown flag bits"));
    }
    let heartbeat = Duration::from_millis(u64::from(b.get_u32()));
    let dead_after = Duration::from_millis(u64::from(b.get_u32()));
    if heartbeat.is_zero() || dead_after.is_zero() {
        return Err(malformed(F, "heartbeat and dead_after must be positive"));
    }
    let session = if flags & WELCOME_SESSION != 0 {
        if b.len() < 8 + TOKEN_LEN + 8 + 4 {
            return Err(malformed(F, "session fields must be 36 bytes"));
        }
        let session_id = b.get_u64();
        let mut token = [0u8; TOKEN_LEN];
        b.copy_to_slice(&mut token);
        let last_received = b.get_u64();
        let linger = Duration::from_millis(u64::from(b.get_u32()));
        Some(SessionGrant {
            session_id,
            token,
            resumed: flags & WELCOME_RESUMED != 0,
            last_received,
            linger,
        })
    } else {
        if flags & WELCOME_RESUMED != 0 {
            return Err(malformed(F, "resumed flag without a session"));
        }
        None
    };
    let credential_ttl = if flags & WELCOME_CREDENTIAL_TTL != 0 {
        if b.len() < 4 {
            return Err(malformed(F, "credential ttl flag without the 4-byte ttl"));
        }
        Some(Duration::from_millis(u64::from(b.get_u32())))
    } else {
        None
    };
    if !b.is_empty() {
        return Err(malformed(F, "trailing bytes"));
    }
    Ok(Welcome {
        heartbeat,
        dead_after,
        session,
        credential_ttl,
    })
}

/// Incremental frame decoder.
///
/// Feed it whatever the transport delivered; it yields whole frames. Complete frames are
/// parsed straight from the input slice; only an incomplete tail is copied into an internal
/// buffer, and that buffer is released as soon as the frame completes, so an idle connection
/// holds no decode buffer. The announced length is checked against the maximum *before*
/// anything is reserved.
#[derive(Debug)]
pub struct Decoder {
    max_frame_len: u32,
    /// A bulk stream's state, in what was padding (the decoder does not grow): the low
    /// [`ALLOWANCE_BITS`] bits are the largest frame (header included) of at least
    /// [`LARGE_FRAME`] bytes decoded so far: the size a frame's buffer may have at once (see
    /// [`frame_room`](Self::frame_room)); the bits above count the small frames that may
    /// still follow the last large one in bulk mode ([`next_read_limit`](Self::next_read_limit)).
    bulk: u32,
    partial: BytesMut,
}

/// A frame at least this large (header included) starts a bulk stream: a driver reads frame
/// by frame ([`Decoder::next_read_limit`]), and a later frame's buffer is sized for the whole
/// frame (up to the largest such frame) by its first read in place, so each large body is
/// read with no copy and no move of a growing buffer.
pub const LARGE_FRAME: usize = 64 * 1024;
/// Bits of `Decoder::bulk` that hold the largest large frame (frames above 128 MiB count as
/// 128 MiB).
const ALLOWANCE_BITS: u32 = 27;
const ALLOWANCE_MASK: u32 = (1 << ALLOWANCE_BITS) - 1;
/// Small frames read one by one after a large frame before bulk mode ends: the WINDOW or
/// heartbeat between two large messages does not end it; a stream of small messages does,
/// after this many extra reads.
const SMALL_IN_BULK: u32 = 4;

/// What [`Decoder::decode`] saw in one call.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DecodeStats {
    /// Frames yielded (heartbeats included).
    pub frames: usize,
    /// Of which heartbeats.
    pub heartbeats: usize,
}

impl Decoder {
    /// A decoder that refuses frames whose body is longer than `max_frame_len`.
    pub fn new(max_frame_len: u32) -> Self {
        Decoder {
            max_frame_len,
            bulk: 0,
            partial: BytesMut::new(),
        }
    }

    /// What an empty decoder carries from one frame to the next (its bulk-stream state), for
    /// a parked connection's compact form (`conn::FrozenConn`); `None` while it holds part of
    /// a frame. [`resumed`](Self::resumed) gives back an equal decoder.
    pub(crate) fn idle_state(&self) -> Option<u32> {
        self.partial.is_empty().then_some(self.bulk)
    }

    /// An empty decoder with the state [`idle_state`](Self::idle_state) returned.
    pub(crate) fn resumed(max_frame_len: u32, bulk: u32) -> Self {
        Decoder {
            max_frame_len,
            bulk,
            partial: BytesMut::new(),
        }
    }

    /// In a bulk stream (a large frame, at least [`LARGE_FRAME`], was among the last few),
    /// the most the next read should take so that it ends where a frame does: the next
    /// frame's length header alone ([`HEADER_LEN`] bytes, or what it still misses), or the
    /// rest of a small frame. A driver that reads so never takes a large frame's start
    /// through a copy: its whole body is read into its own buffer
    /// ([`frame_room`](Self::frame_room)). `None` outside a bulk stream (read as much as
    /// there is) and while a frame's body may be read in place.
    pub fn next_read_limit(&self) -> Option<usize> {
        if self.bulk >> ALLOWANCE_BITS == 0 {
            return None;
        }
        let held = self.partial.len();
        if held < HEADER_LEN {
            return Some(HEADER_LEN - held);
        }
        Some(self.frame_rest()).filter(|&n| n > 0)
    }

    /// Notes a frame of `total` bytes (header included) decoded.
    fn note_frame(&mut self, total: usize) {
        if total >= LARGE_FRAME {
            let size = u32::try_from(total).unwrap_or(u32::MAX).min(ALLOWANCE_MASK);
            let allowance = (self.bulk & ALLOWANCE_MASK).max(size);
            self.bulk = SMALL_IN_BULK << ALLOWANCE_BITS | allowance;
        } else if self.bulk >> ALLOWANCE_BITS > 0 {
            self.bulk -= 1 << ALLOWANCE_BITS;
        }
    }

    /// How large the buffer of the frame held in part may be made for a read in place
    /// ([`frame_body_buf`](Self::frame_body_buf)): four times what arrived, or what arrived
    /// plus the largest large frame decoded before; never more than the frame. Either way a
    /// peer that announces a frame and stalls costs no more than it sent, or than a frame it
    /// already sent; and only a driver that reads in place grows it so (a server's driver
    /// after admitting the frame into its partial-frame budget): what
    /// [`decode`](Self::decode) reserves for a frame's start is four times what arrived.
    fn buffer_bound(&self, held: usize, total: usize) -> usize {
        held.saturating_mul(4)
            .max(held + (self.bulk & ALLOWANCE_MASK) as usize)
            .min(total)
    }

    /// The configured maximum body length.
    pub fn max_frame_len(&self) -> u32 {
        self.max_frame_len
    }

    /// Bytes held for an incomplete frame.
    pub fn buffered(&self) -> usize {
        self.partial.len()
    }

    /// Capacity currently allocated for incomplete frames (0 when idle).
    pub fn buffer_capacity(&self) -> usize {
        self.partial.capacity()
    }

    /// How many more bytes of the frame held in part may be read straight into its buffer
    /// now ([`frame_body_buf`](Self::frame_body_buf)) instead of decoded from a copy: what
    /// the frame still misses once its length header is complete (and within the limit), at
    /// most three times what arrived (the buffer stays within four times what was received,
    /// as in [`decode`](Self::decode)), or, once large frames came, up to the largest of
    /// them; 0 otherwise.
    pub fn frame_room(&self) -> usize {
        let held = self.partial.len();
        let rest = self.frame_rest();
        rest.min(self.buffer_bound(held, held + rest) - held)
    }

    /// Bytes still missing from the frame held in part, once its length header is complete
    /// (and within the limit); 0 otherwise.
    fn frame_rest(&self) -> usize {
        if self.partial.len() < HEADER_LEN {
            return 0;
        }
        let len = u32::from_be_bytes([
            self.partial[0],
            self.partial[1],
            self.partial[2],
            self.partial[3],
        ]);
        if self.check_len(len).is_err() {
            return 0;
        }
        (HEADER_LEN + len as usize).saturating_sub(self.partial.len())
    }

    /// The buffer of the frame held in part, with room for at most `max` more of its bytes
    /// and never more than [`frame_room`](Self::frame_room) (so never beyond the frame, and
    /// the buffer grows to at most four times what arrived, or the frame's size). Whatever
    /// is put into it is part of the frame; [`decode`](Self::decode) with no input then
    /// yields the frame once it is whole.
    pub fn frame_body_buf(&mut self, max: usize) -> bytes::buf::Limit<&mut BytesMut> {
        let len = self.partial.len();
        let n = self.frame_room().min(max);
        if len + n > self.partial.capacity() {
            let total = len + self.frame_rest();
            let grow_to = self.buffer_bound(len, total).max(len + n);
            self.partial.reserve(grow_to - len);
        }
        (&mut self.partial).limit(n)
    }

    fn check_len(&self, len: u32) -> Result<(), DecodeError> {
        if len > self.max_frame_len {
            Err(DecodeError::Oversize {
                len,
                max: self.max_frame_len,
            })
        } else {
            Ok(())
        }
    }

    /// Decodes every complete frame in `input` (after any buffered tail), calling `sink` for
    /// each. Stops at the first error; after an error the decoder must not be used again.
    /// `sink` returns `false` to stop decoding early (the rest of the input is dropped).
    pub fn decode(
        &mut self,
        mut input: &[u8],
        mut sink: impl FnMut(Frame) -> bool,
    ) -> Result<DecodeStats, DecodeError> {
        let mut stats = DecodeStats::default();
        let mut emit = |frame: Frame, stats: &mut DecodeStats| {
            stats.frames += 1;
            if matches!(frame, Frame::Heartbeat) {
                stats.heartbeats += 1;
            }
            sink(frame)
        };
        // Finish a frame started in an earlier call.
        if !self.partial.is_empty() {
            if self.partial.len() < HEADER_LEN {
                let take = (HEADER_LEN - self.partial.len()).min(input.len());
                self.partial.extend_from_slice(&input[..take]);
                input = &input[take..];
                if self.partial.len() < HEADER_LEN {
                    return Ok(stats);
                }
            }
            let len = u32::from_be_bytes([
                self.partial[0],
                self.partial[1],
                self.partial[2],
                self.partial[3],
            ]);
            self.check_len(len)?;
            let total = HEADER_LEN + len as usize;
            let take = (total - self.partial.len()).min(input.len());
            // Grow only with bytes actually received: a peer that announces a large frame
            // and stalls costs what it sent (at most four times it), not what it announced.
            // Four times, up to the frame's size, rather than doubling: a 256 KiB frame that
            // arrives in 16 KiB reads is moved to a larger buffer twice, not four times.
            // (The capacity stays within twice the frame, what a server's frame budget
            // charges for it.)
            let need = self.partial.len() + take;
            if need > self.partial.capacity() {
                let grow_to = need.saturating_mul(4).min(total).max(need);
                self.partial.reserve(grow_to - self.partial.len());
            }
            self.partial.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.partial.len() < total {
                return Ok(stats);
            }
            // Whole: the buffer goes with the frame (a DATA or SEQ_DATA payload is a slice
            // of it, not a copy), and the decoder holds none until the next partial frame.
            let whole = std::mem::take(&mut self.partial).freeze();
            self.note_frame(total);
            let frame = if len == 0 {
                Frame::Heartbeat
            } else {
                parse_shared(&whole, HEADER_LEN, total)?
            };
            if !emit(frame, &mut stats) {
                return Ok(stats);
            }
        }
        // Two or more complete frames: copied once into one block that their payloads are
        // sliced from (one allocation per read, not one per message; tokio-util's
        // `LengthDelimitedCodec` shares its read buffer the same way). Only complete frames
        // go into the block, so it holds no more than the messages it carries (and their
        // headers) and is freed with the last of them; a single frame is copied on its own.
        let (complete, count) = complete_prefix(input, self.max_frame_len);
        let block = (count >= 2).then(|| Bytes::copy_from_slice(&input[..complete]));
        let mut at = 0;
        while input.len() - at >= HEADER_LEN {
            let rest = &input[at..];
            let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
            self.check_len(len)?;
            let total = HEADER_LEN + len as usize;
            if rest.len() < total {
                break;
            }
            let frame = match &block {
                _ if len == 0 => Frame::Heartbeat,
                Some(b) if at + total <= complete => parse_shared(b, at + HEADER_LEN, at + total)?,
                _ => parse_body(&rest[HEADER_LEN..total])?,
            };
            at += total;
            self.note_frame(total);
            if !emit(frame, &mut stats) {
                return Ok(stats);
            }
        }
        input = &input[at..];
        if !input.is_empty() {
            // The start of a frame: room for up to four times what arrived (as above), so
            // the rest, read here or straight into this buffer, does not move it again.
            if input.len() >= HEADER_LEN {
                let total = HEADER_LEN
                    + u32::from_be_bytes([input[0], input[1], input[2], input[3]]) as usize;
                self.partial
                    .reserve(input.len().saturating_mul(4).min(total).max(input.len()));
            }
            self.partial.extend_from_slice(input);
        }
        Ok(stats)
    }
}
