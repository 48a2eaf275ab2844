//! Credentials on a connection (`docs/PROTOCOL.md` §"AUTH and AUTH_OK"): the server closes
//! a connection when its credential runs out, unless the client refreshed it in band.
//!
//! ```text
//!  client                                         server
//!  HELLO(credential) ───────────────────────────▶ app: authorize → accept_authenticated(ttl)
//!  WELCOME(ttl) ◀──────────────────────────────── expires_at = now + ttl
//!  refresh_at = now + 90 % of ttl
//!  … RefreshCredential event at refresh_at
//!  AUTH(new credential) ────────────────────────▶ Auth event → app: refresh check
//!  CredentialRefreshed ◀── AUTH_OK(ttl') ──────── auth_ok(ttl'):  expires_at = now + ttl'
//!                     ◀── CLOSE(7) ────────────── auth_refused(text), or expires_at passed
//! ```
//!
//! A ttl of 0 on the wire (`None` here) means the credential does not expire: no timer on
//! either side. The server's timer is armed from the principal's expiry even when the HELLO
//! carried no credential (a client certificate's `notAfter`); the WELCOME then carries no
//! ttl, since such a client cannot refresh in band and reconnects instead.

use std::time::{Duration, Instant};

use crate::codec::{self, Credential, Frame};
use crate::reason::CloseCode;

use super::{Conn, ConnEvent, Role, State};

/// Smallest credential ttl a server arms or sends: a ttl that is not zero is at least 1 ms
/// on the wire, so the timer is too (the two must agree).
const MIN_TTL: Duration = Duration::from_millis(1);

/// A client refreshes its credential once nine tenths of the ttl have passed, in whole
/// milliseconds rounded down (`docs/PROTOCOL.md` §13: "at the WELCOME's arrival +
/// ⌊ttl × 9/10⌋ ms").
fn refresh_after(ttl: Duration) -> Duration {
    let ms = ttl.as_millis() * 9 / 10;
    Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
}

/// What a connection knows about its credential.
#[derive(Debug, Default)]
pub(super) struct CredentialState {
    /// The HELLO carried a credential (client: ours; server: the peer's). Only then may the
    /// client send AUTH, and only then does the WELCOME carry a ttl.
    pub(super) negotiated: bool,
    /// When the credential runs out. Server: the connection is closed then (CLOSE 7).
    /// Client: only reported (the server enforces it).
    pub(super) expires_at: Option<Instant>,
    /// Server: an AUTH was delivered to the application and not answered yet.
    pub(super) refresh_pending: bool,
    /// Client: when to ask the application for a new credential (90 % of the ttl).
    pub(super) refresh_at: Option<Instant>,
    /// Client: AUTH sent, AUTH_OK not received yet.
    pub(super) auth_in_flight: bool,
}

impl CredentialState {
    /// The credential's deadline for this end: the server's expiry, the client's refresh.
    pub(super) fn deadline(&self, role: Role) -> Option<Instant> {
        match role {
            Role::Server => self.expires_at,
            Role::Client => self.refresh_at,
        }
    }
}

/// What a connection without credential state reads (nothing negotiated, nothing armed).
static NO_CREDENTIAL: CredentialState = CredentialState {
    negotiated: false,
    expires_at: None,
    refresh_pending: false,
    refresh_at: None,
    auth_in_flight: false,
};

impl Conn {
    /// The credential state (an empty one when there is none).
    pub(super) fn cred(&self) -> &CredentialState {
        self.cred.as_deref().unwrap_or(&NO_CREDENTIAL)
    }

    /// The credential state, created on first write.
    pub(super) fn cred_mut(&mut self) -> &mut CredentialState {
        self.cred.get_or_insert_with(Box::default)
    }
}

/// Why [`Conn::refresh_credential`] did not send an AUTH.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RefreshError {
    /// The handshake has not completed, or the connection ended.
    #[error("connection not established")]
    NotEstablished,
    /// Only a client sends AUTH.
    #[error("only a client refreshes its credential")]
    NotClient,
    /// The HELLO carried no credential: the server would treat AUTH as a protocol error.
    #[error("the hello carried no credential; there is nothing to refresh")]
    NoCredential,
    /// An AUTH is already waiting for its AUTH_OK.
    #[error("a refresh is already in flight")]
    InFlight,
    /// The credential is empty or longer than 8192 bytes.
    #[error(transparent)]
    Length(#[from] codec::CredentialLenError),
}

impl Conn {
    /// When the credential runs out: the server closes then unless refreshed (`None`: it does
    /// not expire, or there is none).
    pub fn credential_expires_at(&self) -> Option<Instant> {
        self.cred().expires_at
    }

    /// Server: accept the client as [`accept`](Self::accept) does, with a credential that
    /// runs out in `credential_ttl` (`None`: it does not expire). The connection is closed
    /// with CLOSE(CREDENTIAL_EXPIRED) at `now + credential_ttl` unless the client refreshes
    /// it (AUTH, answered with [`auth_ok`](Self::auth_ok)). When the HELLO carried a
    /// credential, the WELCOME tells the client the ttl (0 for `None`).
    pub fn accept_authenticated(
        &mut self,
        now: Instant,
        cfg: impl Into<std::sync::Arc<crate::liveness::LivenessConfig>>,
        session: Option<(codec::SessionGrant, crate::session::Session)>,
        credential_ttl: Option<Duration>,
    ) {
        let ttl = credential_ttl.map(|t| t.max(MIN_TTL));
        self.accept_inner(now, cfg.into(), session, ttl);
    }

    /// The WELCOME's `credential_ttl` field for a server accepting with `ttl`.
    pub(super) fn welcome_ttl(&self, ttl: Option<Duration>) -> Option<Duration> {
        self.cred()
            .negotiated
            .then(|| ttl.unwrap_or(Duration::ZERO))
    }

    /// Server: arms the expiry at acceptance.
    pub(super) fn arm_expiry(&mut self, now: Instant, ttl: Option<Duration>) {
        match ttl {
            Some(t) => self.cred_mut().expires_at = Some(now + t),
            None => {
                if let Some(c) = self.cred.as_deref_mut() {
                    c.expires_at = None;
                }
            }
        }
    }

    /// Client: the WELCOME arrived with `ttl` (`None` or zero: no expiry). A ttl without a
    /// credential in the HELLO was refused as a protocol error before this.
    pub(super) fn client_welcome_ttl(&mut self, now: Instant, ttl: Option<Duration>) {
        self.schedule_refresh(now, ttl.unwrap_or(Duration::ZERO));
    }

    fn schedule_refresh(&mut self, now: Instant, ttl: Duration) {
        if ttl.is_zero() {
            if let Some(c) = self.cred.as_deref_mut() {
                c.expires_at = None;
                c.refresh_at = None;
            }
        } else {
            self.cred_mut().expires_at = Some(now + ttl);
            self.cred_mut().refresh_at = Some(now + refresh_after(ttl));
        }
    }

    /// The earliest credential deadline this side acts on.
    pub(super) fn credential_timeout(&self) -> Option<Instant> {
        self.cred().deadline(self.role)
    }

    /// Acts on a credential deadline due at `now`: the server closes an expired connection,
    /// the client asks for a new credential (once per ttl).
    pub(super) fn credential_timer(&mut self, now: Instant) {
        match self.role {
            Role::Server => {
                if self.cred().expires_at.is_some_and(|at| now >= at) {
                    self.cred_mut().expires_at = None;
                    self.close(
                        now,
                        CloseCode::CREDENTIAL_EXPIRED,
                        "credential expired without a refresh",
                    );
                }
            }
            Role::Client => {
                if self.cred().refresh_at.is_some_and(|at| now >= at) {
                    self.cred_mut().refresh_at = None;
                    let expires_in = self
                        .cred_mut()
                        .expires_at
                        .map(|at| at.saturating_duration_since(now))
                        .unwrap_or_default();
                    self.events
                        .push_back(ConnEvent::RefreshCredential { expires_in });
                }
            }
        }
    }

    /// Client: sends `credential` in an AUTH frame (after a
    /// [`ConnEvent::RefreshCredential`], or earlier). The server answers AUTH_OK
    /// ([`ConnEvent::CredentialRefreshed`]) or closes with CLOSE(CREDENTIAL_EXPIRED).
    pub fn refresh_credential(
        &mut self,
        now: Instant,
        credential: Credential,
    ) -> Result<(), RefreshError> {
        if self.role != Role::Client {
            return Err(RefreshError::NotClient);
        }
        if !matches!(self.state, State::Established) {
            return Err(RefreshError::NotEstablished);
        }
        if !self.cred().negotiated {
            return Err(RefreshError::NoCredential);
        }
        if self.cred().auth_in_flight {
            return Err(RefreshError::InFlight);
        }
        codec::check_credential(&credential)?;
        codec::encode(&Frame::Auth(credential), &mut self.out);
        self.cred_mut().auth_in_flight = true;
        self.cred_mut().refresh_at = None;
        self.liveness.on_send(now);
        Ok(())
    }

    /// Server: an AUTH frame arrived.
    pub(super) fn on_auth(&mut self, now: Instant, credential: Credential) {
        if self.role != Role::Server {
            self.protocol_error(now, "unexpected AUTH at a client".into());
        } else if !self.cred().negotiated {
            self.protocol_error(now, "AUTH but the hello carried no credential".into());
        } else if self.cred().refresh_pending {
            self.protocol_error(now, "AUTH before the previous AUTH was answered".into());
        } else {
            self.cred_mut().refresh_pending = true;
            self.events.push_back(ConnEvent::Auth(credential));
        }
    }

    /// Client: an AUTH_OK frame arrived.
    pub(super) fn on_auth_ok(&mut self, now: Instant, ttl: Duration) {
        if self.role != Role::Client {
            self.protocol_error(now, "unexpected AUTH_OK at a server".into());
        } else if !self.cred().auth_in_flight {
            self.protocol_error(now, "AUTH_OK without an AUTH".into());
        } else {
            self.cred_mut().auth_in_flight = false;
            self.schedule_refresh(now, ttl);
            self.events
                .push_back(ConnEvent::CredentialRefreshed { ttl });
        }
    }

    /// Server: the refreshed credential (the last [`ConnEvent::Auth`]) is accepted and runs
    /// out in `ttl` (`None`: it does not expire). Sends AUTH_OK; the expiry restarts from
    /// `now`. Ignored when no AUTH is waiting for an answer.
    pub fn auth_ok(&mut self, now: Instant, ttl: Option<Duration>) {
        if !self.cred().refresh_pending || !matches!(self.state, State::Established) {
            return;
        }
        self.cred_mut().refresh_pending = false;
        let ttl = ttl.map(|t| t.max(MIN_TTL));
        codec::encode(&Frame::AuthOk(ttl.unwrap_or(Duration::ZERO)), &mut self.out);
        self.liveness.on_send(now);
        self.arm_expiry(now, ttl);
    }

    /// Server: the refreshed credential (the last [`ConnEvent::Auth`]) is refused: closes
    /// with CLOSE(CREDENTIAL_EXPIRED, `text`). Ignored when no AUTH is waiting for an answer.
    pub fn auth_refused(&mut self, now: Instant, text: &str) {
        if !self.cred().refresh_pending {
            return;
        }
        self.cred_mut().refresh_pending = false;
        self.close(now, CloseCode::CREDENTIAL_EXPIRED, text);
    }
}

#[cfg(test)]
mod tests {
    use super::refresh_after;
    use std::time::Duration;

    #[test]
    fn refresh_comes_at_nine_tenths_of_the_ttl_in_whole_milliseconds() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        assert_eq!(refresh_after(s(10)), s(9));
        assert_eq!(refresh_after(s(3600)), s(3240));
        // ⌊1001 × 9/10⌋ = 900 ms (not 900.9).
        assert_eq!(refresh_after(ms(1001)), ms(900));
        assert_eq!(refresh_after(ms(1)), ms(0));
        let max = ms(u64::from(u32::MAX));
        assert!(refresh_after(max) < max);
    }
}
