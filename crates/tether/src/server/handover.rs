//! Moving a session between servers: what a server hands over ([`SessionExport`]), what the
//! other asks for ([`SessionRequest`]), and the hook through which a server asks
//! ([`SessionSource`]). The library knows nothing of how the bytes travel (the cluster layer
//! of `tether serve` uses Redis streams, docs/CLUSTER.md).
//!
//! ```text
//!  client ──HELLO(resume id, token)──▶ server B: no such session here
//!     B: SessionSource::fetch(SessionRequest{client, session, SHA-256(token), principal})
//!        ···▶ server A: ServerHandle::take_session(req)   (token hash and principal checked
//!                 held → taken at once                      on A: a wrong token moves nothing)
//!                 attached → CLOSE(REPLACED) to the old connection, taken when it has ended
//!        ◀··· SessionExport (to_bytes / from_bytes)
//!     B: imported as a held session, then the normal resume check ──▶ WELCOME(RESUMED)
//! ```
//!
//! The export's byte layout (version 1; integers big-endian; `str16` is a `u16` length and
//! UTF-8, `msgs` a `u32` count then each message as a `u32` length and its bytes):
//!
//! ```text
//!  "TSX" 0x01 | client id str16 | session id u64 | principal (0 | 1 scheme issuer? name)
//!  | token hash [32] | previous (0 | 1 [32]) | last_seq u64 | acked u64 | last_received u64
//!  | resumes u64 | replay msgs (acked+1 ..= last_seq) | pending msgs (never sent)
//! ```
//!
//! Its size is bounded by the session's replay bounds
//! ([`SessionConfig`](tether_proto::session::SessionConfig): 4 MiB / 4096 messages by
//! default) plus the per-client outbox bound ([`outbox_bytes`](super::ServerConfig::outbox_bytes),
//! 4 MiB), plus 5 bytes per message and a few hundred bytes of header.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tether_proto::codec::MAX_CLIENT_ID_LEN;
use tether_proto::session::{Session, SessionState};
use thiserror::Error;

use crate::auth::resume::TokenHash;
use crate::auth::{PrincipalKey, Scheme};

const MAGIC: &[u8; 3] = b"TSX";
const VERSION: u8 = 1;
/// The longest principal field (scheme name, issuer, name) an export carries.
const MAX_PRINCIPAL_FIELD: usize = 4096;
/// The longest message an export carries (a frame is at most 16 MiB).
const MAX_MESSAGE: usize = 16 << 20;
/// The most messages one list of an export carries.
const MAX_MESSAGES: usize = 1 << 20;

/// A session as one server hands it to another: the client and session ids, who owns it,
/// what authenticates its next resume (the token hashes, never a token), its sequence
/// state with the unacknowledged messages, and the messages queued for the client that
/// were never sent. Made by [`ServerHandle::take_session`](super::ServerHandle::take_session),
/// carried as bytes ([`to_bytes`](Self::to_bytes) / [`from_bytes`](Self::from_bytes)),
/// installed by [`ServerHandle::import_session`](super::ServerHandle::import_session) or a
/// [`SessionSource`].
#[derive(Clone, PartialEq, Eq)]
pub struct SessionExport {
    pub(super) client_id: String,
    pub(super) principal: Option<PrincipalKey>,
    pub(super) hash: TokenHash,
    pub(super) previous: Option<TokenHash>,
    pub(super) state: SessionState,
    pub(super) pending: Vec<Bytes>,
}

impl fmt::Debug for SessionExport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionExport")
            .field("client_id", &self.client_id)
            .field("session", &self.state.id)
            .field("last_seq", &self.state.last_seq)
            .field("acked", &self.state.acked)
            .field("last_received", &self.state.last_received)
            .field("replay", &self.state.replay.len())
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

/// Why bytes are not a session export.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The bytes do not start with the export's magic.
    #[error("not a session export (bad magic)")]
    BadMagic,
    /// A version this build does not read.
    #[error("session export version {0} is not supported (this build reads version 1)")]
    Version(u8),
    /// The bytes end inside a field.
    #[error("session export truncated in {what}")]
    Truncated {
        /// The field.
        what: &'static str,
    },
    /// A length beyond its bound.
    #[error("{what} of {len} is more than the bound of {max}")]
    TooLong {
        /// The field.
        what: &'static str,
        /// Its length (bytes or messages).
        len: usize,
        /// The bound.
        max: usize,
    },
    /// A field that is not what it must be.
    #[error("{what} is not valid: {why}")]
    Invalid {
        /// The field.
        what: &'static str,
        /// Why.
        why: String,
    },
    /// Bytes after the end.
    #[error("{0} bytes after the end of the session export")]
    Trailing(usize),
}

/// Why an export was not installed ([`ServerHandle::import_session`](super::ServerHandle::import_session)).
/// In every case the session was reported lost on this server
/// ([`ServerEvent::SessionLost`](super::ServerEvent::SessionLost)): nothing vanishes.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ImportError {
    /// This server holds no sessions (`session_linger` is off or zero).
    #[error("sessions are off on this server")]
    SessionsOff,
    /// The client id has a connection or a session here already.
    #[error("the client id has a connection or a session here already")]
    Busy,
    /// The session state is inconsistent.
    #[error("session state: {0}")]
    Invalid(#[source] tether_proto::session::SessionStateError),
}

impl SessionExport {
    /// Assembles an export. `state`'s replay must hold exactly its unacknowledged messages.
    pub(super) fn new(
        client_id: &str,
        resume: &crate::auth::resume::ResumeCredential,
        session: &Session,
        pending: Vec<Bytes>,
    ) -> Self {
        Self::of(client_id, resume, session.state(), pending)
    }

    /// The session's identity without numbers or messages (`ServerHandle::session_header`).
    pub(super) fn header(
        client_id: &str,
        session: u64,
        resume: &crate::auth::resume::ResumeCredential,
    ) -> Self {
        let state = SessionState {
            id: session,
            last_seq: 0,
            acked: 0,
            last_received: 0,
            resumes: 0,
            replay: Vec::new(),
        };
        Self::of(client_id, resume, state, Vec::new())
    }

    /// The client's identity (principal, token hashes) with `state` and `pending`.
    fn of(
        client_id: &str,
        resume: &crate::auth::resume::ResumeCredential,
        state: SessionState,
        pending: Vec<Bytes>,
    ) -> Self {
        let (hash, previous) = resume.hashes();
        SessionExport {
            client_id: client_id.to_owned(),
            principal: resume.principal().cloned(),
            hash: hash.clone(),
            previous: previous.cloned(),
            state,
            pending,
        }
    }

    /// The same identity (client, principal, token hashes) with another sequence state and
    /// pending messages: a durable copy kept elsewhere supplies them. The session id stays
    /// this export's. Refused when the state is inconsistent.
    pub fn with_state(
        mut self,
        state: SessionState,
        pending: Vec<Bytes>,
    ) -> Result<SessionExport, ExportError> {
        if state.id != self.state.id {
            return Err(invalid(
                "session id",
                format!("{} is not the export's {}", state.id, self.state.id),
            ));
        }
        state
            .check()
            .map_err(|e| invalid("session state", e.to_string()))?;
        if state.last_seq.checked_add(pending.len() as u64).is_none() {
            return Err(invalid("pending", "numbers beyond 2^64".into()));
        }
        self.state = state;
        self.pending = pending;
        Ok(self)
    }

    /// Whether `req` names this session and authenticates for it: the client id, the
    /// session id, the principal, and the token hash (the current one or the one before
    /// the last rotation; compared in constant time) — what the holder checks before a
    /// hand-over, for a copy of the session kept elsewhere.
    pub fn accepts(&self, req: &SessionRequest) -> bool {
        let current = self.hash.same(&req.token_hash);
        let previous = self
            .previous
            .as_ref()
            .is_some_and(|h| h.same(&req.token_hash));
        self.client_id == req.client_id
            && self.state.id == req.session_id
            && self.principal == req.principal
            && (current | previous)
    }

    /// The client id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The session id.
    pub fn session_id(&self) -> u64 {
        self.state.id
    }

    /// The principal that owns the session (`None` on a server without authorization).
    pub fn principal(&self) -> Option<&PrincipalKey> {
        self.principal.as_ref()
    }

    /// The session's sequence state and unacknowledged messages.
    pub fn state(&self) -> &SessionState {
        &self.state
    }

    /// Messages queued for the client and never sent; they get the numbers after
    /// `state().last_seq`, in order.
    pub fn pending(&self) -> &[Bytes] {
        &self.pending
    }

    /// The bytes of the messages it carries (replay and pending).
    pub fn message_bytes(&self) -> usize {
        self.state
            .replay
            .iter()
            .chain(&self.pending)
            .map(Bytes::len)
            .sum()
    }

    /// The encoded form (see the module docs for the layout).
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(128 + self.message_bytes());
        b.put_slice(MAGIC);
        b.put_u8(VERSION);
        put_str16(&mut b, &self.client_id);
        b.put_u64(self.state.id);
        put_principal(&mut b, self.principal.as_ref());
        b.put_slice(&self.hash.to_bytes());
        match &self.previous {
            Some(h) => {
                b.put_u8(1);
                b.put_slice(&h.to_bytes());
            }
            None => b.put_u8(0),
        }
        b.put_u64(self.state.last_seq);
        b.put_u64(self.state.acked);
        b.put_u64(self.state.last_received);
        b.put_u64(self.state.resumes);
        put_msgs(&mut b, &self.state.replay);
        put_msgs(&mut b, &self.pending);
        b.freeze()
    }

    /// Decodes an export; every length is checked against what is left before anything is
    /// taken, the messages share `bytes`' memory. Never panics.
    pub fn from_bytes(bytes: Bytes) -> Result<SessionExport, ExportError> {
        let mut r = Reader(bytes);
        if r.take(3, "magic")?.as_ref() != MAGIC {
            return Err(ExportError::BadMagic);
        }
        let v = r.u8("version")?;
        if v != VERSION {
            return Err(ExportError::Version(v));
        }
        let client_id = r.str16("client id", MAX_CLIENT_ID_LEN)?;
        tether_proto::check_client_id(&client_id).map_err(|e| ExportError::Invalid {
            what: "client id",
            why: e.to_string(),
        })?;
        let id = r.u64("session id")?;
        let principal = r.principal()?;
        let hash = TokenHash::from_bytes(r.hash("token hash")?);
        let previous = match r.u8("previous token flag")? {
            0 => None,
            1 => Some(TokenHash::from_bytes(r.hash("previous token hash")?)),
            n => return Err(invalid("previous token flag", format!("{n} is not 0 or 1"))),
        };
        let last_seq = r.u64("last_seq")?;
        let acked = r.u64("acked")?;
        let last_received = r.u64("last_received")?;
        let resumes = r.u64("resumes")?;
        let replay = r.msgs("replay")?;
        let pending = r.msgs("pending")?;
        if !r.0.is_empty() {
            return Err(ExportError::Trailing(r.0.len()));
        }
        if last_seq.checked_add(pending.len() as u64).is_none() {
            return Err(invalid("pending", "numbers beyond 2^64".into()));
        }
        let state = SessionState {
            id,
            last_seq,
            acked,
            last_received,
            resumes,
            replay,
        };
        state
            .check()
            .map_err(|e| invalid("session state", e.to_string()))?;
        Ok(SessionExport {
            client_id,
            principal,
            hash,
            previous,
            state,
            pending,
        })
    }
}

/// What a server asks another for: the session `session_id` of `client_id`, on behalf of a
/// client that presented a token hashing to `token_hash` as `principal`. The holder hands it
/// over only when all of these match (a wrong token moves nothing).
#[derive(Clone, PartialEq, Eq)]
pub struct SessionRequest {
    /// The client id of the HELLO.
    pub client_id: String,
    /// The session it resumes.
    pub session_id: u64,
    /// SHA-256 of the resume token it presented (`TokenHash::of`).
    pub token_hash: TokenHash,
    /// The principal it authenticated as (`None` on a server without authorization).
    pub principal: Option<PrincipalKey>,
    /// The last number the client received in order (its HELLO's `last_received`). Not
    /// carried in [`to_bytes`](Self::to_bytes) (the holder does not need it; 0 when
    /// decoded): for a source that rebuilds the session from a copy, which must hold
    /// every number after it.
    pub last_received: u64,
}

impl fmt::Debug for SessionRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionRequest")
            .field("client_id", &self.client_id)
            .field("session_id", &self.session_id)
            .field("principal", &self.principal)
            .finish_non_exhaustive()
    }
}

impl SessionRequest {
    /// The encoded form: `"TSQ" 0x01 | client id str16 | session id u64 | token hash [32] |
    /// principal`.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(64 + self.client_id.len());
        b.put_slice(b"TSQ");
        b.put_u8(VERSION);
        put_str16(&mut b, &self.client_id);
        b.put_u64(self.session_id);
        b.put_slice(&self.token_hash.to_bytes());
        put_principal(&mut b, self.principal.as_ref());
        b.freeze()
    }

    /// Decodes a request. Never panics.
    pub fn from_bytes(bytes: Bytes) -> Result<SessionRequest, ExportError> {
        let mut r = Reader(bytes);
        if r.take(3, "magic")?.as_ref() != b"TSQ" {
            return Err(ExportError::BadMagic);
        }
        let v = r.u8("version")?;
        if v != VERSION {
            return Err(ExportError::Version(v));
        }
        let client_id = r.str16("client id", MAX_CLIENT_ID_LEN)?;
        let session_id = r.u64("session id")?;
        let token_hash = TokenHash::from_bytes(r.hash("token hash")?);
        let principal = r.principal()?;
        if !r.0.is_empty() {
            return Err(ExportError::Trailing(r.0.len()));
        }
        Ok(SessionRequest {
            client_id,
            session_id,
            token_hash,
            principal,
            last_received: 0,
        })
    }
}

/// A session being fetched from elsewhere (see [`SessionSource`]).
pub struct SessionFetch(Pin<Box<dyn Future<Output = Option<SessionExport>> + Send + 'static>>);

impl SessionFetch {
    /// Wraps the future that fetches.
    pub fn new(fetch: impl Future<Output = Option<SessionExport>> + Send + 'static) -> Self {
        SessionFetch(Box::pin(fetch))
    }

    /// Nothing to fetch: the resume is refused as today (SESSION_UNKNOWN).
    pub fn none() -> Self {
        SessionFetch::new(std::future::ready(None))
    }
}

impl Future for SessionFetch {
    type Output = Option<SessionExport>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<SessionExport>> {
        self.0.as_mut().poll(cx)
    }
}

impl fmt::Debug for SessionFetch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionFetch(..)")
    }
}

/// Where a server looks for a session it does not hold when a HELLO asks to resume it (see
/// [`ServerConfig::session_source`](super::ServerConfig::session_source)). The handshake
/// waits for the fetch (at most the handshake timeout; bound it tighter yourself); an
/// export is installed as a held session and then the normal resume check runs (token,
/// client id, principal: the same refusals as for a local session). `None` → REFUSE
/// SESSION_UNKNOWN as without a source. An export that arrives after the connection gave up
/// is installed all the same (held for the linger, then reported lost): nothing vanishes.
pub trait SessionSource: Send + Sync + 'static {
    /// Starts fetching the session `req` names. Called on the connection's task: must not
    /// block.
    fn fetch(&self, req: SessionRequest) -> SessionFetch;
}

fn invalid(what: &'static str, why: String) -> ExportError {
    ExportError::Invalid { what, why }
}

fn put_str16(b: &mut BytesMut, s: &str) {
    // Every string written is bounded far below u16::MAX (client ids, principal fields).
    let len = s.len().min(usize::from(u16::MAX));
    b.put_u16(len as u16);
    b.put_slice(&s.as_bytes()[..len]);
}

fn put_principal(b: &mut BytesMut, p: Option<&PrincipalKey>) {
    let Some(p) = p else {
        b.put_u8(0);
        return;
    };
    b.put_u8(1);
    match &p.scheme {
        Scheme::Jwt => b.put_u8(0),
        Scheme::Mtls => b.put_u8(1),
        Scheme::Custom(s) => {
            b.put_u8(2);
            put_str16(b, s);
        }
    }
    match &p.issuer {
        Some(i) => {
            b.put_u8(1);
            put_str16(b, i);
        }
        None => b.put_u8(0),
    }
    put_str16(b, &p.name);
}

fn put_msgs(b: &mut BytesMut, msgs: &[Bytes]) {
    b.put_u32(msgs.len() as u32);
    for m in msgs {
        b.put_u32(m.len() as u32);
        b.put_slice(m);
    }
}

/// Reads fields off the front of the bytes, checking each length first.
struct Reader(Bytes);

impl Reader {
    fn take(&mut self, n: usize, what: &'static str) -> Result<Bytes, ExportError> {
        if self.0.len() < n {
            return Err(ExportError::Truncated { what });
        }
        Ok(self.0.split_to(n))
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, ExportError> {
        Ok(self.take(1, what)?.get_u8())
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, ExportError> {
        Ok(self.take(2, what)?.get_u16())
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, ExportError> {
        Ok(self.take(4, what)?.get_u32())
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, ExportError> {
        Ok(self.take(8, what)?.get_u64())
    }

    fn hash(&mut self, what: &'static str) -> Result<[u8; 32], ExportError> {
        let mut h = [0u8; 32];
        h.copy_from_slice(&self.take(32, what)?);
        Ok(h)
    }

    fn str16(&mut self, what: &'static str, max: usize) -> Result<String, ExportError> {
        let len = usize::from(self.u16(what)?);
        if len > max {
            return Err(ExportError::TooLong { what, len, max });
        }
        let b = self.take(len, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| invalid(what, "not UTF-8".into()))
    }

    fn principal(&mut self) -> Result<Option<PrincipalKey>, ExportError> {
        match self.u8("principal flag")? {
            0 => return Ok(None),
            1 => {}
            n => return Err(invalid("principal flag", format!("{n} is not 0 or 1"))),
        }
        let scheme = match self.u8("principal scheme")? {
            0 => Scheme::Jwt,
            1 => Scheme::Mtls,
            2 => Scheme::Custom(self.str16("principal scheme", MAX_PRINCIPAL_FIELD)?),
            n => return Err(invalid("principal scheme", format!("unknown scheme {n}"))),
        };
        let issuer = match self.u8("principal issuer flag")? {
            0 => None,
            1 => Some(self.str16("principal issuer", MAX_PRINCIPAL_FIELD)?),
            n => {
                return Err(invalid(
                    "principal issuer flag",
                    format!("{n} is not 0 or 1"),
                ))
            }
        };
        let name = self.str16("principal name", MAX_PRINCIPAL_FIELD)?;
        Ok(Some(PrincipalKey {
            scheme,
            issuer,
            name,
        }))
    }

    fn msgs(&mut self, what: &'static str) -> Result<Vec<Bytes>, ExportError> {
        let n = self.u32(what)? as usize;
        // Each message takes at least its 4-byte length: a count beyond that is a lie, and
        // no allocation is made for it.
        if n > MAX_MESSAGES {
            return Err(ExportError::TooLong {
                what,
                len: n,
                max: MAX_MESSAGES,
            });
        }
        if n.saturating_mul(4) > self.0.len() {
            return Err(ExportError::Truncated { what });
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let len = self.u32(what)? as usize;
            if len > MAX_MESSAGE {
                return Err(ExportError::TooLong {
                    what: "message",
                    len,
                    max: MAX_MESSAGE,
                });
            }
            out.push(self.take(len, what)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SessionExport {
        SessionExport {
            client_id: "dev-1".into(),
            principal: Some(PrincipalKey {
                scheme: Scheme::Custom("api-key".into()),
                issuer: Some("iss".into()),
                name: "alice".into(),
            }),
            hash: TokenHash::of(&[1; 16]),
            previous: Some(TokenHash::of(&[2; 16])),
            state: SessionState {
                id: 77,
                last_seq: 12,
                acked: 10,
                last_received: 5,
                resumes: 2,
                replay: vec![Bytes::from_static(b"eleven"), Bytes::from_static(b"")],
            },
            pending: vec![Bytes::from_static(b"thirteen")],
        }
    }

    #[test]
    fn round_trips() {
        let e = sample();
        assert_eq!(SessionExport::from_bytes(e.to_bytes()).unwrap(), e);
        let mut bare = sample();
        bare.principal = None;
        bare.previous = None;
        assert_eq!(SessionExport::from_bytes(bare.to_bytes()).unwrap(), bare);
        let req = SessionRequest {
            client_id: "dev-1".into(),
            session_id: 77,
            token_hash: TokenHash::of(&[3; 16]),
            principal: sample().principal,
            last_received: 0,
        };
        assert_eq!(SessionRequest::from_bytes(req.to_bytes()).unwrap(), req);
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let b = sample().to_bytes();
        assert_eq!(
            SessionExport::from_bytes(Bytes::from_static(b"XXX\x01")),
            Err(ExportError::BadMagic)
        );
        let mut v = b.to_vec();
        v[3] = 9;
        assert_eq!(
            SessionExport::from_bytes(v.into()),
            Err(ExportError::Version(9))
        );
        for cut in [4, 10, b.len() - 1] {
            let e = SessionExport::from_bytes(b.slice(..cut)).unwrap_err();
            assert!(matches!(e, ExportError::Truncated { .. }), "{cut}: {e}");
        }
        let mut v = b.to_vec();
        v.push(0);
        assert_eq!(
            SessionExport::from_bytes(v.into()),
            Err(ExportError::Trailing(1))
        );
        let mut bad = sample();
        bad.state.replay.pop();
        let e = SessionExport::from_bytes(bad.to_bytes()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "session state is not valid: replay holds 1 messages; 2 are unacknowledged"
        );
        bad = sample();
        bad.client_id = "a\nb".into();
        let e = SessionExport::from_bytes(bad.to_bytes()).unwrap_err();
        assert!(
            matches!(
                e,
                ExportError::Invalid {
                    what: "client id",
                    ..
                }
            ),
            "{e}"
        );
        // A message count far beyond what the bytes hold is refused before any allocation.
        let mut v = b.to_vec();
        let pending_count_at = v.len() - (4 + 4 + 8);
        v[pending_count_at..pending_count_at + 4].copy_from_slice(&0x00ff_ffffu32.to_be_bytes());
        let e = SessionExport::from_bytes(v.into()).unwrap_err();
        assert!(
            matches!(
                e,
                ExportError::TooLong { .. } | ExportError::Truncated { .. }
            ),
            "{e}"
        );
    }

    /// Fuzz-style: random bytes, and every truncation and single-byte change of a valid
    /// export, decode to a value or an error; never a panic.
    #[test]
    fn never_panics_on_any_input() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let len = (next() % 200) as usize;
            let mut v: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if next() % 2 == 0 && v.len() >= 4 {
                v[..4].copy_from_slice(b"TSX\x01");
            }
            let _ = SessionExport::from_bytes(v.clone().into());
            let _ = SessionRequest::from_bytes(v.into());
        }
        let good = sample().to_bytes();
        for cut in 0..good.len() {
            assert!(SessionExport::from_bytes(good.slice(..cut)).is_err());
        }
        for i in 0..good.len() {
            for x in [0x01u8, 0x80, 0xff] {
                let mut v = good.to_vec();
                v[i] ^= x;
                let _ = SessionExport::from_bytes(v.into());
            }
        }
    }
}
