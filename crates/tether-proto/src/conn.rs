//! One tether connection as a sans-IO state machine: preamble, handshake, frames, liveness.
//!
//! The driver feeds it what the transport delivered ([`Conn::handle_input`]), what happened
//! to the transport ([`Conn::handle_eof`], [`Conn::handle_transport_error`]) and the time
//! ([`Conn::handle_timeout`] when [`Conn::poll_timeout`] is due); it writes out
//! [`Conn::pending_transmit`] and reports progress with [`Conn::transmitted`]; it hands
//! [`Conn::poll_event`] to the application.
//!
//! ```text
//!  client                                  server
//!  ------                                  ------
//!  preamble + HELLO  ───────────────────▶  AwaitPreamble → AwaitHello → Event::Hello
//!                                          app: accept(welcome) | refuse(code, text)
//!  Event::Established ◀─────────────────── preamble + WELCOME | REFUSE
//!  DATA / heartbeats / PING / PONG  ◀────▶ DATA / heartbeats / PING / PONG
//!  CLOSE(code, text) ─────────────────────▶ Event::Closed(PeerClose)
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use thiserror::Error;

use crate::codec::{self, DecodeError, Decoder, Frame, Hello, Welcome, PREAMBLE_LEN};
use crate::liveness::{Liveness, LivenessConfig, LivenessEvent};
use crate::reason::{CloseCode, DisconnectReason};
use crate::session::{Received, Session, SessionConfig};

/// Which end of the connection this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sends HELLO, receives WELCOME.
    Client,
    /// Receives HELLO, answers WELCOME or REFUSE.
    Server,
}

/// Settings that apply before and during the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnConfig {
    /// Longest frame body accepted. Default: 1 MiB.
    pub max_frame_len: u32,
    /// The handshake must complete within this time. Default: 10 s.
    pub handshake_timeout: Duration,
    /// Bounds and ACK timing for a session created on this connection (client side; the
    /// server passes its sessions in [`Conn::accept`]). Default: `SessionConfig::default()`.
    pub session: SessionConfig,
}

impl Default for ConnConfig {
    fn default() -> Self {
        ConnConfig {
            max_frame_len: codec::DEFAULT_MAX_FRAME_LEN,
            handshake_timeout: Duration::from_secs(10),
            session: SessionConfig::default(),
        }
    }
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    /// Why.
    pub reason: DisconnectReason,
    /// How long nothing had been received from the peer when it ended.
    pub silent_for: Duration,
}

/// What a transport reported, translated by the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransportError {
    /// Connection reset (ECONNRESET, EPIPE).
    Reset,
    /// The kernel gave up (ETIMEDOUT). `unacked` says whether sent data was unacknowledged
    /// (TCP_USER_TIMEOUT) or the connection was idle (keepalive probes).
    TimedOut {
        /// Sent data was still unacknowledged.
        unacked: bool,
    },
    /// Anything else.
    Other(String),
}

/// Something the application should know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnEvent {
    /// Server only: a client said hello. Answer with [`Conn::accept`] or [`Conn::refuse`].
    Hello(Hello),
    /// Server only: the peer asked for a probe exchange (the body after the PROBE type byte).
    /// The connection is finished as far as this state machine goes; the driver hands the
    /// transport to the probe responder.
    Probe(Bytes),
    /// The handshake completed with these parameters.
    Established(Welcome),
    /// An application message arrived.
    Message(Bytes),
    /// The peer has been silent past `suspect_after`.
    Suspect {
        /// How long.
        silent_for: Duration,
    },
    /// A suspect peer sent something again.
    Recovered {
        /// How long it had been silent.
        silent_for: Duration,
    },
    /// A new RTT sample.
    Rtt {
        /// This sample.
        sample: Duration,
        /// Smoothed RTT.
        smoothed: Duration,
    },
    /// A session was resumed on this connection: `replayed` messages of ours are being sent
    /// again (the peer had not received them).
    Resumed {
        /// Messages replayed by this side.
        replayed: u64,
    },
    /// Client only: the session could not be resumed; these messages of ours may not have
    /// been delivered (`None`: nothing was outstanding). A new session starts.
    SessionLost {
        /// Sequence numbers that may not have been delivered.
        unacked: Option<std::ops::RangeInclusive<u64>>,
    },
    /// The connection ended. Always the last event.
    Closed(Disconnect),
}

/// Why [`Conn::send`] refused a message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SendError {
    /// The handshake has not completed yet.
    #[error("connection not established yet")]
    NotEstablished,
    /// The connection has ended.
    #[error("connection closed")]
    Closed,
    /// The session's replay buffer is full: wait for the peer's ACK and try again.
    #[error("replay buffer full")]
    Full,
    /// The message is longer than the maximum frame length.
    #[error("message of {len} bytes exceeds the maximum frame length {max}")]
    TooLong {
        /// Message length.
        len: usize,
        /// Largest payload accepted.
        max: usize,
    },
}

#[derive(Debug)]
enum State {
    /// Waiting for the peer's preamble (`got` bytes so far).
    Preamble { buf: [u8; PREAMBLE_LEN], got: usize },
    /// Server: waiting for HELLO.
    AwaitHello,
    /// Server: HELLO delivered, waiting for the application's decision.
    AwaitDecision,
    /// Client: waiting for WELCOME or REFUSE.
    AwaitWelcome,
    /// Handshake complete.
    Established,
    /// Finished; only pending transmit bytes remain.
    Closed,
}

/// Counters kept by a connection.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConnStats {
    /// Application messages received.
    pub messages_in: u64,
    /// Application messages sent.
    pub messages_out: u64,
    /// Bytes received (all of them).
    pub bytes_in: u64,
    /// Bytes handed to the transport.
    pub bytes_out: u64,
    /// Heartbeats received.
    pub heartbeats_in: u64,
    /// Heartbeats sent.
    pub heartbeats_out: u64,
}

/// One connection's protocol state. See the module docs.
#[derive(Debug)]
pub struct Conn {
    role: Role,
    cfg: ConnConfig,
    state: State,
    decoder: Decoder,
    out: BytesMut,
    events: VecDeque<ConnEvent>,
    liveness: Option<Liveness>,
    handshake_deadline: Option<Instant>,
    /// Local liveness options applied once established (server: what it told the client).
    local: Option<LivenessConfig>,
    last_rx: Instant,
    close_received: bool,
    handed_off: bool,
    heartbeat_in_this_read: bool,
    session: Option<Session>,
    /// Client: a session was asked for. Server: the client's resume position, if it resumes.
    want_session: bool,
    peer_resume: Option<u64>,
    stats: ConnStats,
}

impl Conn {
    /// A client connection: queues the preamble and `hello` at once. `local` supplies the
    /// options the server does not dictate (idle timeout, ping interval); the heartbeat
    /// interval and dead-after come from the WELCOME.
    ///
    /// With `session`, the hello asks to resume it (its id, token and last received sequence
    /// number replace `hello.resume`); without one, `hello.want_session` asks for a new session.
    pub fn client(
        now: Instant,
        cfg: ConnConfig,
        hello: &Hello,
        local: LivenessConfig,
        session: Option<Session>,
    ) -> Self {
        let mut c = Conn::new(now, Role::Client, cfg);
        let mut hello = hello.clone();
        if let Some(s) = &session {
            hello.want_session = true;
            hello.resume = Some(codec::ResumeRequest {
                session_id: s.id(),
                token: *s.token(),
                last_received: s.last_received(),
            });
        }
        c.want_session = hello.want_session;
        c.session = session;
        codec::encode_preamble(&mut c.out);
        codec::encode(&Frame::Hello(hello), &mut c.out);
        c.local = Some(local);
        c
    }

    /// A server connection: waits for the client's preamble and HELLO.
    pub fn server(now: Instant, cfg: ConnConfig) -> Self {
        Conn::new(now, Role::Server, cfg)
    }

    fn new(now: Instant, role: Role, cfg: ConnConfig) -> Self {
        Conn {
            role,
            decoder: Decoder::new(cfg.max_frame_len),
            handshake_deadline: Some(now + cfg.handshake_timeout),
            cfg,
            state: State::Preamble {
                buf: [0; PREAMBLE_LEN],
                got: 0,
            },
            out: BytesMut::new(),
            events: VecDeque::new(),
            liveness: None,
            local: None,
            last_rx: now,
            close_received: false,
            handed_off: false,
            heartbeat_in_this_read: false,
            session: None,
            want_session: false,
            peer_resume: None,
            stats: ConnStats::default(),
        }
    }

    /// This end's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// True once the handshake completed and until the connection ends.
    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established)
    }

    /// True once the connection has ended (pending bytes may still need flushing).
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// True when the peer asked for a probe exchange ([`ConnEvent::Probe`]): the driver hands
    /// the transport to the probe responder instead of closing it.
    pub fn is_handed_off(&self) -> bool {
        self.handed_off
    }

    /// Counters.
    pub fn stats(&self) -> ConnStats {
        let mut s = self.stats;
        if let Some(l) = &self.liveness {
            s.heartbeats_out = l.heartbeats_sent();
        }
        s
    }

    /// Smoothed RTT, once measured.
    pub fn srtt(&self) -> Option<Duration> {
        self.liveness.as_ref().and_then(|l| l.srtt())
    }

    /// When anything was last received.
    pub fn last_rx(&self) -> Instant {
        self.last_rx
    }

    /// The liveness engine, once established.
    pub fn liveness(&self) -> Option<&Liveness> {
        self.liveness.as_ref()
    }

    /// Capacity held by the decode and transmit buffers (0 for an idle connection).
    pub fn buffer_capacity(&self) -> usize {
        self.decoder.buffer_capacity() + self.out.capacity()
    }

    /// Server: accept the client with these liveness settings. The WELCOME carries
    /// `cfg.heartbeat_interval` and `cfg.dead_after`. With `session`, the connection runs the
    /// session (sequenced data, ACKs): a new one when `grant.resumed` is false, or the held one
    /// resumed from the client's last received sequence number (its replay starts at once).
    pub fn accept(
        &mut self,
        now: Instant,
        cfg: LivenessConfig,
        session: Option<(codec::SessionGrant, Session)>,
    ) {
        if !matches!(self.state, State::AwaitDecision) {
            return;
        }
        let (grant, session) = match session {
            Some((g, s)) => (Some(g), Some(s)),
            None => (None, None),
        };
        let welcome = Welcome {
            heartbeat: cfg.heartbeat_interval,
            dead_after: cfg.dead_after,
            session: grant.clone(),
            credential_ttl: None,
        };
        codec::encode_preamble(&mut self.out);
        codec::encode(&Frame::Welcome(welcome.clone()), &mut self.out);
        self.establish(now, cfg);
        self.events.push_back(ConnEvent::Established(welcome));
        if let Some(mut s) = session {
            if grant.is_some_and(|g| g.resumed) {
                let from = self.peer_resume.unwrap_or(0);
                match s.resume(from) {
                    Ok(n) => {
                        // Our acknowledgements may have died with the old connection.
                        if let Some(a) = s.poll_ack(now, true) {
                            codec::encode(&Frame::Ack(a), &mut self.out);
                        }
                        self.events.push_back(ConnEvent::Resumed { replayed: n })
                    }
                    Err(e) => {
                        self.session = Some(s);
                        let why = format!("resume from {} but only {} were sent", e.acked, e.sent);
                        self.protocol_error(now, why);
                        return;
                    }
                }
            }
            self.session = Some(s);
            self.pump_session(now);
        }
    }

    /// Server: refuse the client. The connection ends with reason `Refused`.
    pub fn refuse(&mut self, now: Instant, code: CloseCode, text: &str) {
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
        self.finish(
            now,
            DisconnectReason::Refused {
                code,
                text: text.to_owned(),
            },
        );
    }

    fn establish(&mut self, now: Instant, cfg: LivenessConfig) {
        self.state = State::Established;
        self.handshake_deadline = None;
        let mut l = Liveness::new(now, cfg);
        // The handshake itself counted as traffic.
        l.on_receive(self.last_rx.max(now));
        self.liveness = Some(l);
    }

    /// True when a message of `len` bytes can be sent now (the session's replay buffer has
    /// room, or there is no session).
    pub fn can_send(&self, len: usize) -> bool {
        self.session.as_ref().is_none_or(|s| s.has_room(len))
    }

    /// The session running on this connection, if any.
    pub fn session(&self) -> Option<&Session> {
        self.session.as_ref()
    }

    /// Takes the session out (after the connection ended) to hand it to the next connection.
    pub fn take_session(&mut self) -> Option<Session> {
        self.session.take()
    }

    /// Queues an application message (copied). See [`send_bytes`](Self::send_bytes).
    pub fn send(&mut self, now: Instant, payload: &[u8]) -> Result<(), SendError> {
        self.send_bytes(now, &Bytes::copy_from_slice(payload))
    }

    /// Queues an application message. With a session it is sequenced and kept for replay
    /// (the `Bytes` is shared, not copied); [`SendError::Full`] means the replay buffer is
    /// full (see [`can_send`](Self::can_send)).
    pub fn send_bytes(&mut self, now: Instant, payload: &Bytes) -> Result<(), SendError> {
        match self.state {
            State::Established => {}
            State::Closed => return Err(SendError::Closed),
            _ => return Err(SendError::NotEstablished),
        }
        let max = self.cfg.max_frame_len as usize - if self.session.is_some() { 9 } else { 1 };
        if payload.len() > max {
            return Err(SendError::TooLong {
                len: payload.len(),
                max,
            });
        }
        match &mut self.session {
            Some(s) => {
                if s.push(payload.clone()).is_none() {
                    return Err(SendError::Full);
                }
                self.pump_session(now);
            }
            None => {
                codec::encode_data(payload, &mut self.out);
                self.stats.messages_out += 1;
                if let Some(l) = &mut self.liveness {
                    l.on_send(now);
                }
            }
        }
        if let Some(l) = &mut self.liveness {
            l.on_app_data(now);
        }
        Ok(())
    }

    /// Transmits every session message not yet sent on this connection, with a piggybacked
    /// cumulative ACK when one is owed (same write, so the same TCP segment).
    fn pump_session(&mut self, now: Instant) {
        let Some(s) = &mut self.session else { return };
        let mut sent = false;
        while let Some((seq, msg)) = s.next_to_send() {
            codec::encode_seq_data(seq, &msg, &mut self.out);
            self.stats.messages_out += 1;
            sent = true;
        }
        if sent {
            if let Some(a) = s.poll_ack(now, true) {
                codec::encode(&Frame::Ack(a), &mut self.out);
            }
            if let Some(l) = &mut self.liveness {
                l.on_send(now);
            }
        }
    }

    fn send_due_ack(&mut self, now: Instant) {
        let Some(s) = &mut self.session else { return };
        if let Some(a) = s.poll_ack(now, false) {
            codec::encode(&Frame::Ack(a), &mut self.out);
            if let Some(l) = &mut self.liveness {
                l.on_send(now);
            }
        }
    }

    /// Closes in order: queues CLOSE(code, text). The connection ends with `LocalClose`
    /// (or `Replaced` / `IdleTimeout` for those codes).
    pub fn close(&mut self, now: Instant, code: CloseCode, text: &str) {
        let reason = match code {
            CloseCode::REPLACED => DisconnectReason::Replaced,
            CloseCode::IDLE_TIMEOUT => DisconnectReason::IdleTimeout,
            _ => DisconnectReason::LocalClose,
        };
        self.close_with(now, code, text, reason);
    }

    fn close_with(&mut self, now: Instant, code: CloseCode, text: &str, reason: DisconnectReason) {
        if self.is_closed() {
            return;
        }
        if matches!(self.state, State::Established) {
            codec::encode(
                &Frame::Close {
                    code,
                    text: text.to_owned(),
                },
                &mut self.out,
            );
        }
        self.finish(now, reason);
    }

    fn finish(&mut self, now: Instant, reason: DisconnectReason) {
        if self.is_closed() {
            return;
        }
        self.state = State::Closed;
        self.handshake_deadline = None;
        let silent_for = now.saturating_duration_since(self.last_rx);
        self.events
            .push_back(ConnEvent::Closed(Disconnect { reason, silent_for }));
    }

    fn protocol_error(&mut self, now: Instant, why: String) {
        self.close_with(
            now,
            CloseCode::PROTOCOL_ERROR,
            &why,
            DisconnectReason::ProtocolError(why.clone()),
        );
    }

    /// Counts as liveness without data: the driver paused reading because the application
    /// is slow, so bytes may be waiting unread and the peer must not be blamed for it.
    pub fn note_alive(&mut self, now: Instant) {
        if self.is_closed() {
            return;
        }
        if now > self.last_rx {
            self.last_rx = now;
        }
        if let Some(l) = &mut self.liveness {
            l.on_receive(now);
        }
        self.drain_liveness(now);
    }

    /// The transport delivered `data`.
    pub fn handle_input(&mut self, now: Instant, mut data: &[u8]) {
        if self.is_closed() || data.is_empty() {
            return;
        }
        self.stats.bytes_in += data.len() as u64;
        if now > self.last_rx {
            self.last_rx = now;
        }
        if let Some(l) = &mut self.liveness {
            l.on_receive(now);
        }
        // `Recovered` first, before any message these bytes carry (and even when they are
        // only part of a frame).
        self.drain_liveness(now);
        if let State::Preamble { buf, got } = &mut self.state {
            let take = (PREAMBLE_LEN - *got).min(data.len());
            buf[*got..*got + take].copy_from_slice(&data[..take]);
            *got += take;
            data = &data[take..];
            if *got < PREAMBLE_LEN {
                return;
            }
            let preamble = *buf;
            if let Err(e) = codec::check_preamble(&preamble) {
                if self.role == Role::Server && matches!(e, DecodeError::UnsupportedVersion { .. })
                {
                    self.state = State::AwaitDecision;
                    self.refuse(now, CloseCode::UNSUPPORTED_VERSION, &e.to_string());
                } else {
                    // Not a tether peer (or a broken one): answer nothing.
                    self.finish(now, DisconnectReason::ProtocolError(e.to_string()));
                }
                return;
            }
            self.state = match self.role {
                Role::Server => State::AwaitHello,
                Role::Client => State::AwaitWelcome,
            };
        }
        // The decoder is moved out for the loop so frames can be handled as they are parsed
        // (no intermediate Vec); `Decoder::new` does not allocate.
        let mut decoder =
            std::mem::replace(&mut self.decoder, Decoder::new(self.cfg.max_frame_len));
        self.heartbeat_in_this_read = false;
        let result = decoder.decode(data, |f| {
            self.handle_frame(now, f);
            !self.is_closed()
        });
        self.decoder = decoder;
        if let Err(e) = result {
            if !self.is_closed() {
                self.protocol_error(now, e.to_string());
            }
        }
    }

    fn handle_frame(&mut self, now: Instant, frame: Frame) {
        match (&self.state, frame) {
            (State::AwaitHello, Frame::Hello(h)) => {
                self.state = State::AwaitDecision;
                self.peer_resume = h.resume.as_ref().map(|r| r.last_received);
                self.events.push_back(ConnEvent::Hello(h));
            }
            (State::AwaitHello, Frame::Probe(body)) => {
                self.state = State::Closed;
                self.handed_off = true;
                self.handshake_deadline = None;
                self.events.push_back(ConnEvent::Probe(body));
            }
            (State::AwaitHello, f) => {
                self.protocol_error(now, format!("expected HELLO, got {}", frame_name(&f)))
            }
            (State::AwaitDecision, f) => {
                self.protocol_error(now, format!("{} sent before WELCOME", frame_name(&f)))
            }
            (State::AwaitWelcome, Frame::Welcome(w)) => {
                let mut cfg = self
                    .local
                    .take()
                    .unwrap_or_else(|| LivenessConfig::new(w.heartbeat, w.dead_after));
                cfg.heartbeat_interval = w.heartbeat;
                cfg.dead_after = w.dead_after;
                self.establish(now, cfg);
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
            (State::Established, f) => self.handle_established(now, f),
            (State::Preamble { .. } | State::Closed, _) => {}
        }
    }

    fn handle_established(&mut self, now: Instant, frame: Frame) {
        match frame {
            Frame::Heartbeat => {
                self.stats.heartbeats_in += 1;
                // Heartbeats that arrive together (one read) count once towards the flood
                // rule: they were queued behind a stall (ours or the peer's), not sent too often.
                if !self.heartbeat_in_this_read {
                    self.heartbeat_in_this_read = true;
                    if let Some(l) = &mut self.liveness {
                        l.on_heartbeat_received(now);
                    }
                }
            }
            Frame::Data(p) if self.session.is_none() => {
                self.stats.messages_in += 1;
                if let Some(l) = &mut self.liveness {
                    l.on_app_data(now);
                }
                self.events.push_back(ConnEvent::Message(p));
            }
            Frame::SeqData { seq, payload } if self.session.is_some() => {
                let Some(s) = &mut self.session else { return };
                match s.on_data(now, seq) {
                    Received::Deliver => {
                        self.stats.messages_in += 1;
                        if let Some(l) = &mut self.liveness {
                            l.on_app_data(now);
                        }
                        self.events.push_back(ConnEvent::Message(payload));
                        self.send_due_ack(now);
                    }
                    Received::Duplicate => {}
                    Received::Gap { expected } => {
                        self.protocol_error(
                            now,
                            format!("SEQ_DATA {seq} but {expected} was expected"),
                        );
                        return;
                    }
                }
            }
            Frame::Ack(seq) if self.session.is_some() => {
                if let Some(Err(e)) = self.session.as_mut().map(|s| s.on_ack(seq)) {
                    self.protocol_error(
                        now,
                        format!("ACK {} beyond the last sent sequence {}", e.acked, e.sent),
                    );
                    return;
                }
            }
            Frame::Data(_) => {
                self.protocol_error(
                    now,
                    "DATA on a session connection (SEQ_DATA expected)".into(),
                );
                return;
            }
            Frame::Ping(n) => {
                codec::encode(&Frame::Pong(n), &mut self.out);
                if let Some(l) = &mut self.liveness {
                    l.on_send(now);
                }
            }
            Frame::Pong(n) => {
                if let Some(l) = &mut self.liveness {
                    l.on_pong(now, n);
                }
            }
            Frame::Close { code, text } => {
                self.close_received = true;
                let reason = match code {
                    CloseCode::REPLACED => DisconnectReason::Replaced,
                    _ => DisconnectReason::PeerClose { code, text },
                };
                self.finish(now, reason);
            }
            Frame::Extension(_) => {}
            f @ (Frame::SeqData { .. } | Frame::Ack(_)) => self.protocol_error(
                now,
                format!("{} without a negotiated session", frame_name(&f)),
            ),
            f => self.protocol_error(
                now,
                format!("unexpected {} after the handshake", frame_name(&f)),
            ),
        }
        self.drain_liveness(now);
    }

    /// The transport reached end of stream (FIN).
    pub fn handle_eof(&mut self, now: Instant) {
        self.finish(now, DisconnectReason::PeerClosed);
    }

    /// The transport failed.
    pub fn handle_transport_error(&mut self, now: Instant, err: TransportError) {
        let reason = match err {
            TransportError::Reset => DisconnectReason::PeerReset,
            TransportError::TimedOut { unacked: true } => DisconnectReason::UserTimeout,
            TransportError::TimedOut { unacked: false } => DisconnectReason::KeepaliveTimeout,
            TransportError::Other(s) => DisconnectReason::Io(s),
        };
        self.finish(now, reason);
    }

    /// When [`handle_timeout`](Self::handle_timeout) is next needed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_closed() {
            return None;
        }
        if let Some(h) = self.handshake_deadline {
            return Some(h);
        }
        let live = self.liveness.as_ref().and_then(|l| l.poll_timeout());
        let ack = self.session.as_ref().and_then(|s| s.poll_timeout());
        match (live, ack) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Acts on whatever is due at `now`. Harmless when nothing is.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_closed() {
            return;
        }
        if let Some(h) = self.handshake_deadline {
            if now >= h {
                match self.role {
                    Role::Server => {
                        self.state = State::AwaitDecision;
                        self.refuse(
                            now,
                            CloseCode::HANDSHAKE_TIMEOUT,
                            "no hello within the handshake deadline",
                        );
                        if let Some(ConnEvent::Closed(d)) = self.events.back_mut() {
                            d.reason = DisconnectReason::ProtocolError("handshake timeout".into());
                        }
                    }
                    Role::Client => self.finish(
                        now,
                        DisconnectReason::ProtocolError("handshake timeout: no welcome".into()),
                    ),
                }
            }
            return;
        }
        self.send_due_ack(now);
        if let Some(l) = &mut self.liveness {
            l.handle_timeout(now);
        }
        self.drain_liveness(now);
    }

    /// Client: the WELCOME arrived; set up, resume or lose the session.
    fn client_session(&mut self, now: Instant, grant: Option<codec::SessionGrant>) {
        match (grant, self.session.take()) {
            (Some(g), Some(mut s)) if g.resumed && g.session_id == s.id() => {
                match s.resume(g.last_received) {
                    Ok(n) => {
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
                    self.session = Some(Session::new(g.session_id, g.token, self.cfg.session));
                }
            }
        }
    }

    fn drain_liveness(&mut self, now: Instant) {
        while let Some(ev) = self.liveness.as_mut().and_then(|l| l.poll_event()) {
            match ev {
                // Bytes still waiting to be written already prove we are alive when they
                // arrive; a heartbeat queued behind them would only pile up (DESIGN §4).
                LivenessEvent::SendHeartbeat if self.out.is_empty() => {
                    codec::encode(&Frame::Heartbeat, &mut self.out)
                }
                LivenessEvent::SendHeartbeat => {}
                LivenessEvent::SendPing(n) => codec::encode(&Frame::Ping(n), &mut self.out),
                LivenessEvent::PeerDead { silent_for } => {
                    self.close_with(
                        now,
                        CloseCode::HEARTBEAT_TIMEOUT,
                        "nothing received within dead_after",
                        DisconnectReason::HeartbeatTimeout,
                    );
                    if let Some(ConnEvent::Closed(d)) = self.events.back_mut() {
                        d.silent_for = silent_for;
                    }
                }
                LivenessEvent::Suspect { silent_for } => {
                    self.events.push_back(ConnEvent::Suspect { silent_for })
                }
                LivenessEvent::Recovered { silent_for } => {
                    self.events.push_back(ConnEvent::Recovered { silent_for })
                }
                LivenessEvent::IdleTimeout { idle_for } => {
                    let text = format!("no application data for {} ms", idle_for.as_millis());
                    self.close_with(
                        now,
                        CloseCode::IDLE_TIMEOUT,
                        &text,
                        DisconnectReason::IdleTimeout,
                    );
                }
                LivenessEvent::Rtt { sample, smoothed } => {
                    self.events.push_back(ConnEvent::Rtt { sample, smoothed })
                }
                LivenessEvent::HeartbeatFlood { count, window } => {
                    let text = format!(
                        "{count} heartbeats within {} ms: more often than the agreed interval",
                        window.as_millis()
                    );
                    self.close_with(
                        now,
                        CloseCode::POLICY_VIOLATION,
                        &text,
                        DisconnectReason::ProtocolError(text.clone()),
                    );
                }
            }
        }
    }

    /// Bytes waiting to be written to the transport.
    pub fn pending_transmit(&self) -> &[u8] {
        &self.out
    }

    /// The driver wrote `n` bytes of [`pending_transmit`](Self::pending_transmit).
    pub fn transmitted(&mut self, n: usize) {
        let n = n.min(self.out.len());
        self.stats.bytes_out += n as u64;
        if n == self.out.len() {
            // Release the buffer: an idle connection holds none.
            self.out = BytesMut::new();
        } else {
            let _ = self.out.split_to(n);
        }
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<ConnEvent> {
        let ev = self.events.pop_front();
        if ev.is_none() && self.events.capacity() > 0 {
            // Release the queue: an idle connection holds no event buffer.
            self.events = VecDeque::new();
        }
        ev
    }
}

/// A frame's name for error messages.
pub fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Heartbeat => "HEARTBEAT",
        Frame::Data(_) => "DATA",
        Frame::SeqData { .. } => "SEQ_DATA",
        Frame::Ping(_) => "PING",
        Frame::Pong(_) => "PONG",
        Frame::Close { .. } => "CLOSE",
        Frame::Ack(_) => "ACK",
        Frame::Auth(_) => "AUTH",
        Frame::AuthOk(_) => "AUTH_OK",
        Frame::Hello(_) => "HELLO",
        Frame::Welcome(_) => "WELCOME",
        Frame::Refuse { .. } => "REFUSE",
        Frame::Probe(_) => "PROBE",
        Frame::Extension(_) => "EXTENSION",
    }
}
