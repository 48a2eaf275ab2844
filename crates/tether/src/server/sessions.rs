//! A client's session as the server keeps it, and the session part of a HELLO: start a new
//! session, resume a held one, or refuse (`docs/PROTOCOL.md` §"Sessions").
//!
//! A session is *attached* while a connection runs it (the session itself then lives in that
//! connection's state machine) and *held* between connections, for `session_linger`, with
//! the messages queued for the client meanwhile.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;
use tether_proto::codec::{Hello, SessionGrant};
use tether_proto::session::Session;
use tether_proto::CloseCode;

use crate::auth::resume::ResumeCredential;
use crate::auth::PrincipalKey;
use crate::driver::{Command, Shared};

/// A client's session: its id, what authenticates its next resume (a hash of the token,
/// bound to the client id and the principal), and the session itself while it is held.
///
/// The token itself is never kept: it goes out in the WELCOME and is forgotten. The
/// server's copy of the session (`tether_proto::session::Session`) carries a zero token.
#[derive(Debug)]
pub(super) struct SessionSlot {
    pub(super) id: u64,
    pub(super) resume: ResumeCredential,
    /// `Some` between connections; `None` while a connection runs the session.
    pub(super) held: Option<Held>,
    /// Another server takes the session over: when the attached connection ends, the
    /// session goes here instead of being held (`ServerHandle::take_session`).
    pub(super) taker: Option<tokio::sync::oneshot::Sender<super::handover::SessionExport>>,
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

/// A refused session request: the REFUSE code and text, and whether it counts as a failed
/// attempt for the source address (a wrong or used token, another principal's session).
pub(super) struct Refusal {
    pub(super) code: CloseCode,
    pub(super) text: String,
    pub(super) failure: bool,
}

/// Decides the session part of `hello` for a client whose session slot is `slot` and whose
/// live connection (if any) is `live`, as `principal`. `sessions_on`: the server holds
/// sessions at all.
pub(super) fn plan(
    hello: &Hello,
    principal: Option<&PrincipalKey>,
    slot: Option<&SessionSlot>,
    live: Option<&Shared>,
    sessions_on: bool,
) -> Result<Plan, Refusal> {
    let unknown = |failure| Refusal {
        code: CloseCode::SESSION_UNKNOWN,
        text: "unknown or expired session".to_owned(),
        failure,
    };
    let Some(r) = &hello.resume else {
        return Ok(if hello.want_session && sessions_on {
            Plan::New
        } else {
            Plan::None
        });
    };
    if !sessions_on {
        return Err(Refusal {
            code: CloseCode::SESSION_UNKNOWN,
            text: "sessions are disabled on this server".into(),
            failure: false,
        });
    }
    // No session for this id: nothing to guess at (a server restart or an expired hold
    // sends every client here), so it does not count as a failure.
    let Some(slot) = slot else {
        return Err(unknown(false));
    };
    // The id, the principal and the token (in constant time, against its hash), before
    // anything about the session is revealed; the same answer for every mismatch.
    if slot
        .resume
        .check(&hello.client_id, principal, &r.token)
        .is_err()
        || slot.id != r.session_id
    {
        return Err(unknown(true));
    }
    if let Some(held) = &slot.held {
        // A claim beyond what this session sent is refused before the token rotates: the
        // held session (and the token its owner holds) stays as it was.
        let sent = held.session.last_seq();
        if r.last_received > sent {
            return Err(Refusal {
                code: CloseCode::BAD_HELLO,
                text: format!(
                    "resume claims message {} received; this session sent {sent}",
                    r.last_received
                ),
                failure: false,
            });
        }
        return Ok(Plan::Resume);
    }
    // Still attached to the previous connection (the server has not noticed its death
    // yet): close it; the client retries and finds the session held.
    if let Some(live) = live {
        live.command(Command::Close(
            CloseCode::REPLACED,
            "session resumed on a newer connection".into(),
        ));
    }
    Err(Refusal {
        code: CloseCode::SESSION_BUSY,
        text: "session still attached to the previous connection; retry".into(),
        failure: false,
    })
}

/// The grant for a session resumed from `session`, with its new (rotated) token.
pub(super) fn resumed_grant(
    session: &Session,
    token: [u8; tether_proto::codec::TOKEN_LEN],
    linger: std::time::Duration,
) -> SessionGrant {
    SessionGrant {
        session_id: session.id(),
        token,
        resumed: true,
        // In commit-before-ACK mode the WELCOME acknowledges no more than an ACK would: the
        // client replays the rest, dropped here as duplicates until committed.
        last_received: session.ack_position(),
        linger,
    }
}
