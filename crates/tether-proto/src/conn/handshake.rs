//! The handshake: preamble, HELLO → WELCOME | REFUSE, the handshake deadline, and setting up
//! or resuming the session (`docs/PROTOCOL.md` §"Handshake").

use std::sync::Arc;
use std::time::Instant;

use crate::codec::{self, DecodeError, Frame, SessionGrant, PREAMBLE_LEN};
use crate::liveness::LivenessConfig;
use crate::reason::{CloseCode, DisconnectReason};
use crate::session::Session;

use super::{frame_name, Conn, ConnEvent, Role, State};

impl Conn {
    /// Consumes preamble bytes from `data` and returns the rest. Moves to `AwaitHello` /
    /// `AwaitWelcome` once the preamble is complete and valid, or ends the connection.
    pub(super) fn handle_preamble<'a>(&mut self, now: Instant, data: &'a [u8]) -> &'a [u8] {
        let State::Preamble { buf, got } = &mut self.state else {
            return data;
        };
        let at = usize::from(*got);
        let take = (PREAMBLE_LEN - at).min(data.len());
        buf[at..at + take].copy_from_slice(&data[..take]);
        // At most `PREAMBLE_LEN` (5).
        *got = (at + take) as u8;
        if at + take < PREAMBLE_LEN {
            return &[];
        }
        let preamble = *buf;
        match codec::check_preamble(&preamble) {
            Ok(()) => {
                self.state = match self.role {
                    Role::Server => State::AwaitHello,
                    Role::Client => State::AwaitWelcome,
                };
            }
            Err(DecodeError::UnsupportedVersion { found }) if self.role == Role::Server => {
                self.state = State::AwaitDecision;
                let e = DecodeError::UnsupportedVersion { found };
                self.refuse(now, CloseCode::UNSUPPORTED_VERSION, &e.to_string());
            }
            Err(DecodeError::BadMagic { found }) => {
                // Not a tether peer: answer nothing, and say in words what it was.
                let why = not_tether(self.role, &found);
                self.finish(now, DisconnectReason::ProtocolError(why));
            }
            Err(e) => self.finish(now, DisconnectReason::ProtocolError(e.to_string())),
        }
        &data[take..]
    }

    /// A frame before the handshake completed.
    pub(super) fn handle_handshake_frame(&mut self, now: Instant, frame: Frame) {
        match (&self.state, frame) {
            (State::AwaitHello, Frame::Hello(h)) => {
                self.state = State::AwaitDecision;
                self.peer_resume = h.resume.as_ref().map_or(0, |r| r.last_received);
                if h.credential.is_some() {
                    self.cred_mut().negotiated = true;
                }
                self.events.push_back(ConnEvent::Hello(h));
            }
            (State::AwaitHello, Frame::Probe(body)) => {
                self.state = State::Closed;
                self.handed_off = true;
                self.handshaking = false;
                self.events.push_back(ConnEvent::Probe(body));
            }
            (State::AwaitHello, f) => {
                self.protocol_error(now, format!("expected HELLO, got {}", frame_name(&f)))
            }
            (State::AwaitDecision, f) => {
                self.protocol_error(now, format!("{} sent before WELCOME", frame_name(&f)))
            }
            (State::AwaitWelcome, Frame::Welcome(w))
                if w.credential_ttl.is_some() && !self.cred().negotiated =>
            {
                self.protocol_error(
                    now,
                    "WELCOME carries CREDENTIAL_TTL but the hello carried no credential".into(),
                )
            }
            (State::AwaitWelcome, Frame::Welcome(w)) => {
                let mut cfg = self
                    .local
                    .take()
                    .map(|b| *b)
                    .unwrap_or_else(|| LivenessConfig::new(w.heartbeat, w.dead_after));
                cfg.heartbeat_interval = w.heartbeat;
                cfg.dead_after = w.dead_after;
                self.establish(now, Arc::new(cfg));
                self.client_welcome_ttl(now, w.credential_ttl);
                let grant = w.session.clone();
                self.events.push_back(ConnEvent::Established(w));
                self.client_session(now, grant);
            }
            (State::AwaitWelcome, Frame::Refuse { code, text }) => {
                if code == CloseCode::SESSION_UNKNOWN {
                    if let Some(old) = self.session.take() {
                        self.events.push_back(ConnEvent::SessionLost {
                            unacked: old.unacked_range(),
                        });
                    }
                }
                self.finish(now, DisconnectReason::Refused { code, text });
            }
            (State::AwaitWelcome, f) => self.protocol_error(
                now,
                format!("expected WELCOME or REFUSE, got {}", frame_name(&f)),
            ),
            (State::Established | State::Preamble { .. } | State::Closed, _) => {}
        }
    }

    /// Server: accept the client with these liveness settings. The WELCOME carries
    /// `cfg.heartbeat_interval` and `cfg.dead_after`. With `session`, the connection runs the
    /// session (sequenced data, ACKs): a new one when `grant.resumed` is false, or the held one
    /// resumed from the client's last received sequence number (its replay starts at once).
    ///
    /// A connection whose credential expires is accepted with
    /// [`accept_authenticated`](Self::accept_authenticated).
    pub fn accept(
        &mut self,
        now: Instant,
        cfg: impl Into<Arc<LivenessConfig>>,
        session: Option<(SessionGrant, Session)>,
    ) {
        self.accept_inner(now, cfg.into(), session, None);
    }

    pub(super) fn accept_inner(
        &mut self,
        now: Instant,
        cfg: Arc<LivenessConfig>,
        session: Option<(SessionGrant, Session)>,
        credential_ttl: Option<std::time::Duration>,
    ) {
        if !matches!(self.state, State::AwaitDecision) {
            return;
        }
        let (grant, session) = match session {
            Some((g, s)) => (Some(g), Some(s)),
            None => (None, None),
        };
        let welcome = codec::Welcome {
            heartbeat: cfg.heartbeat_interval,
            dead_after: cfg.dead_after,
            session: grant.clone(),
            credential_ttl: self.welcome_ttl(credential_ttl),
        };
        codec::encode_preamble(&mut self.out);
        codec::encode(&Frame::Welcome(welcome.clone()), &mut self.out);
        self.establish(now, cfg);
        self.arm_expiry(now, credential_ttl);
        self.events.push_back(ConnEvent::Established(welcome));
        let Some(mut s) = session else { return };
        if grant.is_some_and(|g| g.resumed) {
            let from = self.peer_resume;
            match s.resume(from) {
                Ok(n) => {
                    // Our acknowledgements may have died with the old connection.
                    if let Some(a) = s.poll_ack(now, true) {
                        codec::encode(&Frame::Ack(a), &mut self.out);
                    }
                    self.events.push_back(ConnEvent::Resumed { replayed: n })
                }
                Err(e) => {
                    self.session = Some(Box::new(s));
                    let why = format!("resume from {} but only {} were sent", e.acked, e.sent);
                    self.protocol_error(now, why);
                    return;
                }
            }
        }
        self.session = Some(Box::new(s));
        self.pump_session(now);
    }

    /// Server: refuse the client. The connection ends with reason `Refused`.
    pub fn refuse(&mut self, now: Instant, code: CloseCode, text: &str) {
        let reason = DisconnectReason::Refused {
            code,
            text: text.to_owned(),
        };
        self.refuse_with(now, code, text, reason);
    }

    fn refuse_with(&mut self, now: Instant, code: CloseCode, text: &str, reason: DisconnectReason) {
        if !matches!(
            self.state,
            State::AwaitDecision | State::AwaitHello | State::Preamble { .. }
        ) {
            return;
        }
        codec::encode_preamble(&mut self.out);
        codec::encode(
            &Frame::Refuse {
                code,
                text: text.to_owned(),
            },
            &mut self.out,
        );
        self.finish(now, reason);
    }

    /// The handshake deadline passed.
    pub(super) fn handshake_timed_out(&mut self, now: Instant) {
        match self.role {
            // The client is told why (REFUSE), the server reports a protocol error.
            Role::Server => self.refuse_with(
                now,
                CloseCode::HANDSHAKE_TIMEOUT,
                "no hello within the handshake deadline",
                DisconnectReason::ProtocolError("handshake timeout".into()),
            ),
            Role::Client => self.finish(
                now,
                DisconnectReason::ProtocolError("handshake timeout: no welcome".into()),
            ),
        }
    }

    fn establish(&mut self, now: Instant, cfg: Arc<LivenessConfig>) {
        self.state = State::Established;
        self.was_established = true;
        self.handshaking = false;
        // The handshake itself counted as traffic.
        self.liveness.start(now, cfg);
    }

    /// Client: the WELCOME arrived; set up, resume or lose the session.
    fn client_session(&mut self, now: Instant, grant: Option<SessionGrant>) {
        match (grant, self.session.take()) {
            (Some(g), Some(mut s)) if g.resumed && g.session_id == s.id() => {
                match s.resume(g.last_received) {
                    Ok(n) => {
                        // The server rotates the token on every resume: keep the newest.
                        s.set_token(g.token);
                        // Our acknowledgements may have died with the old connection.
                        if let Some(a) = s.poll_ack(now, true) {
                            codec::encode(&Frame::Ack(a), &mut self.out);
                        }
                        self.events.push_back(ConnEvent::Resumed { replayed: n });
                        self.session = Some(s);
                        self.pump_session(now);
                    }
                    Err(e) => {
                        self.session = Some(s);
                        let why = format!(
                            "server resumed from {} but only {} were sent",
                            e.acked, e.sent
                        );
                        self.protocol_error(now, why);
                    }
                }
            }
            (grant, old) => {
                if let Some(old) = old {
                    self.events.push_back(ConnEvent::SessionLost {
                        unacked: old.unacked_range(),
                    });
                }
                if let Some(g) = grant.filter(|_| self.want_session) {
                    self.session = Some(Box::new(Session::new(
                        g.session_id,
                        g.token,
                        self.cfg.session,
                    )));
                }
            }
        }
    }
}

/// What a peer whose first bytes are not the tether preamble is, in words.
fn not_tether(role: Role, found: &[u8; 4]) -> String {
    let who = match role {
        Role::Client => "server",
        Role::Server => "client",
    };
    let like = match found {
        b"HTTP" => Some("it answered like HTTP"),
        b"GET " | b"POST" | b"HEAD" | b"PUT " | b"OPTI" | b"DELE" | b"PATC" | b"CONN" => {
            Some("it sent an HTTP request")
        }
        b"SSH-" => Some("it answered like SSH"),
        [0x16, 0x03, ..] => Some("it spoke TLS"),
        _ => None,
    };
    match like {
        Some(like) => format!("not a tether {who} ({like})"),
        None if found.iter().all(|b| b.is_ascii_graphic() || *b == b' ') => format!(
            "not a tether {who} (its first bytes were {:?}, not \"TTHR\")",
            String::from_utf8_lossy(found)
        ),
        None => format!("not a tether {who} (its first bytes were {found:02x?}, not \"TTHR\")"),
    }
}
