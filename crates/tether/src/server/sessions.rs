//! A client's session as the server keeps it, and the session part of a HELLO: start a new
//! session, resume a held one, or refuse (`docs/PROTOCOL.md` §"Sessions").
//!
//! A session is *attached* while a connection runs it (the session itself then lives in that
//! connection's state machine) and *held* between connections, for `session_linger`, with
//! the messages queued for the client meanwhile.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;
use tether_proto::codec::{Hello, SessionGrant, TOKEN_LEN};
use tether_proto::session::Session;
use tether_proto::CloseCode;

use super::lifecycle::Live;
use crate::driver::Command;

/// A client's session: its id and resume token, and the session itself while it is held.
#[derive(Debug)]
pub(super) struct SessionSlot {
    pub(super) id: u64,
    pub(super) token: [u8; TOKEN_LEN],
    /// `Some` between connections; `None` while a connection runs the session.
    pub(super) held: Option<Held>,
}

/// A session between connections.
#[derive(Debug)]
pub(super) struct Held {
    pub(super) session: Session,
    /// Messages for the client queued while it was away (never sent yet).
    pub(super) pending: VecDeque<Bytes>,
    pub(super) pending_bytes: usize,
    /// When the hold ends.
    pub(super) until: Instant,
}

impl Held {
    /// What the held session counts against the server's unsent budget: the messages queued
    /// for the client and the unacknowledged ones kept for the replay.
    pub(super) fn charged(&self) -> usize {
        self.pending_bytes + self.session.replay_bytes()
    }
}

/// What a HELLO asks for, decided against the client's record.
pub(super) enum Plan {
    /// No session.
    None,
    /// A new session.
    New,
    /// Resume the held session.
    Resume,
}

/// Decides the session part of `hello` for a client whose session slot is `slot` and whose
/// live connection (if any) is `live`. `sessions_on`: the server holds sessions at all.
pub(super) fn plan(
    hello: &Hello,
    slot: Option<&SessionSlot>,
    live: Option<&Live>,
    sessions_on: bool,
) -> Result<Plan, (CloseCode, String)> {
    let unknown = || {
        (
            CloseCode::SESSION_UNKNOWN,
            "unknown or expired session".to_owned(),
        )
    };
    let Some(r) = &hello.resume else {
        return Ok(if hello.want_session && sessions_on {
            Plan::New
        } else {
            Plan::None
        });
    };
    if !sessions_on {
        return Err((
            CloseCode::SESSION_UNKNOWN,
            "sessions are disabled on this server".into(),
        ));
    }
    let Some(slot) = slot else {
        return Err(unknown());
    };
    // The token is compared in constant time, and before anything else is revealed.
    let token_ok = bool::from(subtle::ConstantTimeEq::ct_eq(&slot.token[..], &r.token[..]));
    if !token_ok || slot.id != r.session_id {
        return Err(unknown());
    }
    if slot.held.is_some() {
        return Ok(Plan::Resume);
    }
    // Still attached to the previous connection (the server has not noticed its death
    // yet): close it; the client retries and finds the session held.
    if let Some(live) = live {
        live.shared.command(Command::Close(
            CloseCode::REPLACED,
            "session resumed on a newer connection".into(),
        ));
    }
    Err((
        CloseCode::SESSION_BUSY,
        "session still attached to the previous connection; retry".into(),
    ))
}

/// The grant for a session resumed from `session`.
pub(super) fn resumed_grant(session: &Session, linger: std::time::Duration) -> SessionGrant {
    SessionGrant {
        session_id: session.id(),
        token: *session.token(),
        resumed: true,
        last_received: session.last_received(),
        linger,
    }
}
