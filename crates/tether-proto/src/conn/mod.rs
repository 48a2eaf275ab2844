//! One tether connection as a sans-IO state machine: preamble, handshake, frames, liveness.
//!
//! The driver feeds it what the transport delivered ([`Conn::handle_input`]), what happened
//! to the transport ([`Conn::handle_eof`], [`Conn::handle_transport_error`]) and the time
//! ([`Conn::handle_timeout`] when [`Conn::poll_timeout`] is due); it writes out
//! [`Conn::transmit_chunks`] (or [`Conn::pending_transmit`], one chunk at a time) and reports
//! progress with [`Conn::transmitted`]; it hands [`Conn::poll_event`] to the application.
//!
//! What waits to be written is a queue of chunks: frames are encoded into one transmit
//! buffer, except that a message payload of at least [`SHARE_PAYLOAD_FROM`] bytes is queued
//! as the `Bytes` the application gave (the one the session's replay buffer also holds), right
//! behind its frame header, and the driver writes the chunks with one vectored write:
//!
//! ```text
//!  queued: [ frames before ‖ SEQ_DATA header ] [ payload (shared, not copied) ] ...  out: [ later frames ]
//! ```
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
//!
//! The module is split by phase: `handshake.rs` (preamble, HELLO, WELCOME/REFUSE, the
//! handshake deadline, resuming a session), `established.rs` (frames after the handshake,
//! sending, sessions, liveness events) and `credential.rs` (credential expiry and in-band
//! refresh: AUTH / AUTH_OK). This file holds the types, the dispatch and the end of a
//! connection.
//!
//! Time: the [`Liveness`] engine exists from the start and is the one place that records
//! when anything was last received (`last_rx`); before the handshake completes only the
//! handshake deadline is armed.

mod credential;
mod established;
mod frozen;
mod handshake;
mod parked;
mod transmit;

pub use credential::RefreshError;
pub use frozen::{FrozenConn, FrozenStep};
pub use parked::ParkedStep;
pub use transmit::SHARE_PAYLOAD_FROM;

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use thiserror::Error;

use crate::codec::{self, Decoder, Frame, Hello, Welcome, PREAMBLE_LEN};
use crate::liveness::{Liveness, LivenessConfig};
use crate::reason::{CloseCode, DisconnectReason};
use crate::session::{Session, SessionConfig};

/// Where [`Conn::handle_input_deliver`] hands messages (payload, sequence number).
type Deliver<'a, 'f> = &'a mut (dyn FnMut(Bytes, Option<u64>) + 'f);

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

impl std::fmt::Display for Disconnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (silent for {})",
            self.reason,
            crate::duration::Human::ms(self.silent_for)
        )
    }
}

/// A connection's end is what a send or receive on it fails with.
impl std::error::Error for Disconnect {}

/// What a transport reported, translated by the driver (see
/// [`TransportError::from_io`] for the one mapping from `std::io::Error`).
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
    /// Nothing listens at the address (ECONNREFUSED).
    Refused,
    /// Anything else.
    Other(String),
}

impl TransportError {
    /// Translates an I/O error. `unacked` tells a timeout with data in flight
    /// (`TCP_USER_TIMEOUT`) from an idle one (keepalive probes); it is only consulted for
    /// `TimedOut`.
    pub fn from_io(e: &std::io::Error, unacked: impl FnOnce() -> bool) -> Self {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionReset | K::BrokenPipe | K::ConnectionAborted => TransportError::Reset,
            K::ConnectionRefused => TransportError::Refused,
            K::TimedOut => TransportError::TimedOut { unacked: unacked() },
            kind => TransportError::Other(format!("{kind:?}: {e}")),
        }
    }

    /// The disconnect reason this error stands for.
    pub fn reason(self) -> DisconnectReason {
        match self {
            TransportError::Reset => DisconnectReason::PeerReset,
            TransportError::TimedOut { unacked: true } => DisconnectReason::UserTimeout,
            TransportError::TimedOut { unacked: false } => DisconnectReason::KeepaliveTimeout,
            TransportError::Refused => DisconnectReason::ConnectRefused,
            TransportError::Other(s) => DisconnectReason::Io(s),
        }
    }
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
    Message {
        /// The message.
        payload: Bytes,
        /// Its sequence number in the session (`None` without a session). Numbers are
        /// consecutive from 1 and survive resumption: a receiver that remembers the last one
        /// it processed sees each message exactly once.
        seq: Option<u64>,
    },
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
    /// Server only: the client refreshed its credential (AUTH). Check it (same principal,
    /// still allows the client id) and answer with [`Conn::auth_ok`] or
    /// [`Conn::auth_refused`]; the old credential's expiry still applies until then.
    Auth(codec::Credential),
    /// Client only: 90 % of the credential's ttl has passed; send a new credential with
    /// [`Conn::refresh_credential`] before it runs out, or the server closes the connection
    /// (`credential-expired`).
    RefreshCredential {
        /// Time left until the credential runs out.
        expires_in: Duration,
    },
    /// Client only: the server accepted the refreshed credential (AUTH_OK); it now runs out
    /// in `ttl` (`Duration::ZERO`: it does not expire).
    CredentialRefreshed {
        /// The new credential's time to live.
        ttl: Duration,
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
    /// Waiting for the peer's preamble (`got` bytes so far; a byte, so the state packs with
    /// the connection's flags).
    Preamble { buf: [u8; PREAMBLE_LEN], got: u8 },
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

/// A frame received in part: what the decoder holds for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartialFrame {
    /// Bytes held (header included).
    pub len: usize,
    /// Bytes allocated for them.
    pub capacity: usize,
    /// The frame's whole length (header included), once its header arrived.
    pub total: Option<usize>,
}

/// A connection's next deadline: its liveness engine's, its session's (an ACK due) or its
/// credential's, whichever comes first (one rule for a connection and its frozen form).
fn earliest(
    live: Option<Instant>,
    session: Option<&Session>,
    cred: Option<Instant>,
) -> Option<Instant> {
    let ack = session.and_then(|s| s.poll_timeout());
    [live, ack, cred].into_iter().flatten().min()
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
    /// Shared: a server passes one `Arc` to all its connections.
    cfg: Arc<ConnConfig>,
    state: State,
    decoder: Decoder,
    /// Frames to write, behind the chunks in `queued`.
    out: BytesMut,
    /// Chunks to write before `out` (large payloads, shared, and the frames before them);
    /// `None` when there are none (boxed: an idle connection carries only the pointer).
    queued: Option<Box<transmit::Queued>>,
    events: VecDeque<ConnEvent>,
    /// The liveness engine. It exists from the start so that it is the one record of when
    /// anything was received; its timers are consulted only once established.
    liveness: Liveness,
    /// True once the handshake completed (stays true after the end).
    was_established: bool,
    /// The handshake deadline is armed: it falls `cfg.handshake_timeout` after the
    /// connection's start (the liveness engine's epoch until the handshake completes).
    handshaking: bool,
    /// Client: local liveness options applied once established (the WELCOME supplies the
    /// heartbeat interval and dead-after).
    /// (Boxed: used once, and never on a server.)
    local: Option<Box<LivenessConfig>>,
    close_received: bool,
    handed_off: bool,
    heartbeat_in_this_read: bool,
    /// The idle timeout was postponed for a message of the current read already.
    app_data_in_this_read: bool,
    /// The first bytes (the length header) of the frame the decoder holds in part, and how
    /// many of them arrived: a server charges a frame's announced size against its budget.
    frame_head: [u8; codec::HEADER_LEN],
    frame_head_got: u8,
    /// Boxed: a connection without a session (most idle ones) carries 8 bytes for it.
    session: Option<Box<Session>>,
    /// Client: a session was asked for. Server: the client's resume position, if it resumes.
    want_session: bool,
    /// (0: from the start, as when it does not resume; a plain `u64` keeps `Conn` within
    /// its size bound after the transmit queue's pointer was added).
    peer_resume: u64,
    /// The credential: expiry (server), refresh (client), AUTH in progress.
    /// Boxed, created on first use: a connection without a credential carries 8 bytes.
    cred: Option<Box<credential::CredentialState>>,
    stats: Counters,
}

/// What [`ConnStats`] counts besides the heartbeats sent (the liveness engine counts those):
/// 8 bytes less in every connection.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    messages_in: u64,
    messages_out: u64,
    bytes_in: u64,
    bytes_out: u64,
    heartbeats_in: u64,
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
        cfg: impl Into<Arc<ConnConfig>>,
        hello: &Hello,
        local: LivenessConfig,
        session: Option<Session>,
    ) -> Self {
        let mut c = Conn::new(now, Role::Client, cfg.into(), Arc::new(local.clone()));
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
        if hello.credential.is_some() {
            c.cred_mut().negotiated = true;
        }
        c.session = session.map(Box::new);
        codec::encode_preamble(&mut c.out);
        codec::encode(&Frame::Hello(hello), &mut c.out);
        c.local = Some(Box::new(local));
        c
    }

    /// A server connection: waits for the client's preamble and HELLO. `cfg` may be shared
    /// by every connection of a server (one `Arc`).
    pub fn server(now: Instant, cfg: impl Into<Arc<ConnConfig>>) -> Self {
        // Placeholder liveness settings, shared by every connection in the handshake: only
        // `last_rx` is used before the handshake (no timer of the engine is consulted); the
        // real settings arrive with `accept`.
        static PLACEHOLDER: OnceLock<Arc<LivenessConfig>> = OnceLock::new();
        let placeholder = PLACEHOLDER.get_or_init(|| {
            let t = Duration::from_secs(10);
            Arc::new(LivenessConfig::new(t, t))
        });
        Conn::new(now, Role::Server, cfg.into(), placeholder.clone())
    }

    fn new(now: Instant, role: Role, cfg: Arc<ConnConfig>, liveness: Arc<LivenessConfig>) -> Self {
        Conn {
            role,
            decoder: Decoder::new(cfg.max_frame_len),
            handshaking: true,
            cfg,
            state: State::Preamble {
                buf: [0; PREAMBLE_LEN],
                got: 0,
            },
            out: BytesMut::new(),
            queued: None,
            events: VecDeque::new(),
            liveness: Liveness::new(now, liveness),
            was_established: false,
            local: None,
            close_received: false,
            handed_off: false,
            heartbeat_in_this_read: false,
            app_data_in_this_read: false,
            frame_head: [0; codec::HEADER_LEN],
            frame_head_got: 0,
            session: None,
            want_session: false,
            peer_resume: 0,
            cred: None,
            stats: Counters::default(),
        }
    }

    /// When the handshake must have completed, while it has not.
    fn handshake_deadline(&self) -> Option<Instant> {
        self.handshaking
            .then(|| self.liveness.epoch() + self.cfg.handshake_timeout)
    }

    /// This end's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// True once the handshake completed and until the connection ends.
    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established)
    }

    /// True when an established connection holds nothing in flight: nothing to transmit, no
    /// frame received in part, no event for the application. Only time (what
    /// [`poll_timeout`](Self::poll_timeout) says) or new input can change that, so a driver
    /// may keep such a connection without a task of its own and come back when either
    /// arrives (the tokio driver's parked connections, issue 17).
    pub fn is_quiescent(&self) -> bool {
        self.is_established()
            && self.pending_transmit_len() == 0
            && self.decoder.buffered() == 0
            && self.events.is_empty()
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
        let c = self.stats;
        ConnStats {
            messages_in: c.messages_in,
            messages_out: c.messages_out,
            bytes_in: c.bytes_in,
            bytes_out: c.bytes_out,
            heartbeats_in: c.heartbeats_in,
            heartbeats_out: self.liveness.heartbeats_sent(),
        }
    }

    /// Smoothed RTT, once measured.
    pub fn srtt(&self) -> Option<Duration> {
        self.liveness.srtt()
    }

    /// When anything was last received (the liveness engine's record).
    pub fn last_rx(&self) -> Instant {
        self.liveness.last_rx()
    }

    /// The liveness engine, once established.
    pub fn liveness(&self) -> Option<&Liveness> {
        self.was_established.then_some(&self.liveness)
    }

    /// Capacity held by the decode and transmit buffers (0 for an idle connection). Large
    /// payloads queued by reference are not counted: they are the application's `Bytes`
    /// (held by the session's replay buffer too).
    pub fn buffer_capacity(&self) -> usize {
        self.decoder.buffer_capacity() + self.out.capacity()
    }

    /// The frame received in part (all zero between frames). A server bounds the sum of
    /// these over its connections.
    pub fn partial_frame(&self) -> PartialFrame {
        let total = (usize::from(self.frame_head_got) == codec::HEADER_LEN)
            .then(|| codec::HEADER_LEN + u32::from_be_bytes(self.frame_head) as usize);
        PartialFrame {
            len: self.decoder.buffered(),
            capacity: self.decoder.buffer_capacity(),
            total,
        }
    }

    /// Keeps the length header of the frame the decoder holds in part (`data` was just
    /// decoded).
    fn track_frame_head(&mut self, data: &[u8]) {
        let held = self.decoder.buffered();
        let got = usize::from(self.frame_head_got);
        if held == 0 {
            self.frame_head_got = 0;
        } else if held <= data.len() {
            // The partial frame starts within `data`.
            let start = data.len() - held;
            let n = held.min(codec::HEADER_LEN);
            self.frame_head[..n].copy_from_slice(&data[start..start + n]);
            self.frame_head_got = n as u8;
        } else if got < codec::HEADER_LEN {
            // It continues a frame started earlier whose header was not complete.
            let n = (codec::HEADER_LEN - got).min(data.len());
            self.frame_head[got..got + n].copy_from_slice(&data[..n]);
            self.frame_head_got = (got + n) as u8;
        }
    }

    /// The session running on this connection, if any.
    pub fn session(&self) -> Option<&Session> {
        self.session.as_deref()
    }

    /// The application made the received messages up to `seq` durable: in the session's
    /// commit-before-ACK mode ([`Session::set_commit_mode`]) the ACK may go that far now.
    pub fn commit(&mut self, now: Instant, seq: u64) {
        if let Some(s) = self.session.as_mut() {
            s.commit(now, seq);
        }
    }

    /// Takes the session out (after the connection ended) to hand it to the next connection.
    pub fn take_session(&mut self) -> Option<Session> {
        self.session.take().map(|s| *s)
    }

    /// The transport reached end of stream (FIN).
    pub fn handle_eof(&mut self, now: Instant) {
        self.finish(now, DisconnectReason::PeerClosed);
    }

    /// The transport failed.
    pub fn handle_transport_error(&mut self, now: Instant, err: TransportError) {
        self.finish(now, err.reason());
    }

    /// The transport delivered `data`.
    pub fn handle_input(&mut self, now: Instant, data: &[u8]) {
        self.handle_input_with(now, data, None);
    }

    /// [`handle_input`](Self::handle_input) for a driver whose application has room: each
    /// application message is handed to `on_message` (payload, sequence number) as soon as
    /// it is decoded, instead of waiting in the event queue for
    /// [`poll_event`](Self::poll_event). Order is kept: messages are handed over only from
    /// the front of the queue, so once another event waits there (a liveness change, the
    /// end) the messages after it wait too, and [`poll_event`](Self::poll_event) returns
    /// them in order. What it saves: the queue no longer grows with the read (a 64 KiB read
    /// of small messages queued about a thousand events, allocated and freed on every read).
    pub fn handle_input_deliver(
        &mut self,
        now: Instant,
        data: &[u8],
        on_message: &mut dyn FnMut(Bytes, Option<u64>),
    ) {
        self.handle_input_with(now, data, Some(on_message));
    }

    fn handle_input_with(
        &mut self,
        now: Instant,
        mut data: &[u8],
        mut on_message: Option<Deliver<'_, '_>>,
    ) {
        if self.is_closed() || data.is_empty() {
            return;
        }
        self.stats.bytes_in += data.len() as u64;
        self.liveness.on_receive(now);
        // `Recovered` first, before any message these bytes carry (and even when they are
        // only part of a frame).
        self.drain_liveness(now);
        if matches!(self.state, State::Preamble { .. }) {
            data = self.handle_preamble(now, data);
            if !matches!(self.state, State::AwaitHello | State::AwaitWelcome) {
                return;
            }
        }
        // The decoder is moved out for the loop so frames can be handled as they are parsed
        // (no intermediate Vec); `Decoder::new` does not allocate.
        let mut decoder =
            std::mem::replace(&mut self.decoder, Decoder::new(self.cfg.max_frame_len));
        self.heartbeat_in_this_read = false;
        self.app_data_in_this_read = false;
        let result = decoder.decode(data, |f| {
            self.handle_frame(now, f, on_message.as_deref_mut());
            !self.is_closed()
        });
        self.decoder = decoder;
        self.track_frame_head(data);
        if let Err(e) = result {
            if !self.is_closed() {
                self.protocol_error(now, e.to_string());
            }
        }
    }

    /// How many more bytes of the frame received in part may be read straight into its
    /// buffer now (0 when none, and once closed; see [`Decoder::frame_room`]): a driver may
    /// read up to that many into [`frame_body_buf`](Self::frame_body_buf) and report them
    /// with [`handle_frame_body`](Self::handle_frame_body) rather than hand a copy to
    /// [`handle_input`](Self::handle_input). A large message is then read once, into the
    /// buffer it is delivered in.
    pub fn frame_room(&self) -> usize {
        if self.is_closed() {
            return 0;
        }
        self.decoder.frame_room()
    }

    /// In a stream of large messages, the most the next read should take so that it ends
    /// where a frame does (the next frame's length header alone, or the rest of a small
    /// frame): each large message's body is then read whole into its own buffer
    /// ([`frame_room`](Self::frame_room)). `None` otherwise, and once closed; see
    /// [`Decoder::next_read_limit`].
    pub fn next_read_limit(&self) -> Option<usize> {
        if self.is_closed() {
            return None;
        }
        self.decoder.next_read_limit()
    }

    /// The buffer of the frame received in part, with room for at most `max` more of its
    /// bytes (never more than [`frame_room`](Self::frame_room)). Report what was put there
    /// with [`handle_frame_body`](Self::handle_frame_body).
    pub fn frame_body_buf(&mut self, max: usize) -> bytes::buf::Limit<&mut BytesMut> {
        self.decoder.frame_body_buf(max)
    }

    /// `n` bytes were read into [`frame_body_buf`](Self::frame_body_buf): what
    /// [`handle_input`](Self::handle_input) does for bytes received, for bytes already in
    /// place (the frame is handled once whole).
    pub fn handle_frame_body(&mut self, now: Instant, n: usize) {
        if self.is_closed() || n == 0 {
            return;
        }
        self.stats.bytes_in += n as u64;
        self.liveness.on_receive(now);
        self.drain_liveness(now);
        let mut decoder =
            std::mem::replace(&mut self.decoder, Decoder::new(self.cfg.max_frame_len));
        self.heartbeat_in_this_read = false;
        let result = decoder.decode(&[], |f| {
            self.handle_frame(now, f, None);
            !self.is_closed()
        });
        self.decoder = decoder;
        self.track_frame_head(&[]);
        if let Err(e) = result {
            if !self.is_closed() {
                self.protocol_error(now, e.to_string());
            }
        }
    }

    fn handle_frame(&mut self, now: Instant, frame: Frame, deliver: Option<Deliver<'_, '_>>) {
        match self.state {
            State::Established => self.handle_established(now, frame, deliver),
            State::Preamble { .. } | State::Closed => {}
            _ => self.handle_handshake_frame(now, frame),
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) is next needed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.is_closed() {
            return None;
        }
        if let Some(h) = self.handshake_deadline() {
            return Some(h);
        }
        earliest(
            self.liveness.poll_timeout(),
            self.session.as_deref(),
            self.credential_timeout(),
        )
    }

    /// Acts on whatever is due at `now`. Harmless when nothing is.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_closed() {
            return;
        }
        if let Some(h) = self.handshake_deadline() {
            if now >= h {
                self.handshake_timed_out(now);
            }
            return;
        }
        self.credential_timer(now);
        if self.is_closed() {
            return;
        }
        self.send_due_ack(now);
        self.liveness.handle_timeout(now);
        self.drain_liveness(now);
    }

    /// Closes in order: queues CLOSE(code, text). The connection ends with the reason the
    /// code stands for: `Replaced`, `IdleTimeout`, `SlowConsumer`, `PolicyViolation`,
    /// `CredentialExpired` for those codes, `LocalClose` for any other.
    pub fn close(&mut self, now: Instant, code: CloseCode, text: &str) {
        let reason = match code {
            CloseCode::REPLACED => DisconnectReason::Replaced,
            CloseCode::IDLE_TIMEOUT => DisconnectReason::IdleTimeout,
            CloseCode::SLOW_CONSUMER => DisconnectReason::SlowConsumer,
            CloseCode::POLICY_VIOLATION => DisconnectReason::PolicyViolation,
            CloseCode::CREDENTIAL_EXPIRED => DisconnectReason::CredentialExpired,
            _ => DisconnectReason::LocalClose,
        };
        self.close_with(now, code, text, reason);
    }

    fn close_with(&mut self, now: Instant, code: CloseCode, text: &str, reason: DisconnectReason) {
        if self.is_closed() {
            return;
        }
        if matches!(self.state, State::Established) {
            // The ACK owed goes first: otherwise the peer reports the messages it sent last as
            // possibly lost (conformance vector `client-close-flushes-ack`).
            if let Some(a) = self.session.as_mut().and_then(|s| s.poll_ack(now, true)) {
                codec::encode(&Frame::Ack(a), &mut self.out);
            }
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
        self.handshaking = false;
        let silent_for = self.liveness.silent_for(now);
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

    /// The next bytes waiting to be written to the transport: the first chunk of
    /// [`transmit_chunks`](Self::transmit_chunks). Empty when nothing waits; a driver that
    /// writes one chunk at a time calls it again after [`transmitted`](Self::transmitted).
    pub fn pending_transmit(&self) -> &[u8] {
        match &self.queued {
            Some(q) => q.front(),
            None => &self.out,
        }
    }

    /// All bytes waiting to be written, in order, as chunks (none empty): for one vectored
    /// write. Large message payloads are chunks of their own, not copied (see the module
    /// docs).
    pub fn transmit_chunks(&self) -> impl Iterator<Item = &[u8]> {
        let queued = self.queued.iter().flat_map(|q| q.chunks());
        queued.chain((!self.out.is_empty()).then_some(&self.out[..]))
    }

    /// How many bytes wait to be written (all of [`transmit_chunks`](Self::transmit_chunks)).
    pub fn pending_transmit_len(&self) -> usize {
        self.queued.as_ref().map_or(0, |q| q.len()) + self.out.len()
    }

    /// The transmit-buffer bytes that queuing messages of these lengths copies (a large
    /// payload is queued by reference: only its header is copied), for
    /// [`reserve_transmit`](Self::reserve_transmit).
    pub fn transmit_copy_len(&self, payload_len: usize) -> usize {
        let header = if self.session.is_some() {
            codec::seq_data_frame_len(0)
        } else {
            codec::data_frame_len(0)
        };
        if payload_len >= SHARE_PAYLOAD_FROM {
            header
        } else {
            header + payload_len
        }
    }

    /// Makes room for `additional` more bytes in the transmit buffer in one allocation,
    /// before queuing that many (a driver moving a batch of messages; see
    /// [`transmit_copy_len`](Self::transmit_copy_len)).
    pub fn reserve_transmit(&mut self, additional: usize) {
        self.out.reserve(additional);
    }

    /// The driver wrote the first `n` bytes of [`transmit_chunks`](Self::transmit_chunks)
    /// (across chunks, as a vectored write does).
    pub fn transmitted(&mut self, n: usize) {
        self.transmitted_into(n, &mut BytesMut::new());
    }

    /// [`transmitted`](Self::transmitted), but the transmit buffer, once emptied, goes to
    /// `spare` (cleared) when `spare` holds no allocation, instead of being released: a
    /// driver that lent the connection a buffer
    /// ([`swap_transmit_buffer`](Self::swap_transmit_buffer)) takes it back with the write,
    /// so an idle heartbeat's answer allocates nothing (issue 17). The connection holds no
    /// buffer afterwards either way.
    pub fn transmitted_into(&mut self, n: usize, spare: &mut BytesMut) {
        let mut n = n.min(self.pending_transmit_len());
        self.stats.bytes_out += n as u64;
        if let Some(q) = &mut self.queued {
            n = q.consume(n);
            if q.is_empty() {
                self.queued = None;
            } else {
                return;
            }
        }
        if n == self.out.len() {
            // Release the buffer (to `spare`, when it has none): an idle connection holds
            // none.
            if spare.capacity() == 0 {
                std::mem::swap(&mut self.out, spare);
                spare.clear();
            } else {
                self.out = BytesMut::new();
            }
        } else {
            let _ = self.out.split_to(n);
        }
    }

    /// Swaps the transmit buffer with `spare` (cleared) when nothing waits to be written;
    /// false (nothing done) otherwise. A driver lends a parked connection's wake-up a buffer
    /// it keeps, so that the answer to a heartbeat is encoded without an allocation, and
    /// takes it back after the write ([`transmitted_into`](Self::transmitted_into)) or,
    /// unused, with this again. What is encoded, and whether, is the connection's decision
    /// as ever: only the buffer's allocation is the driver's.
    pub fn swap_transmit_buffer(&mut self, spare: &mut BytesMut) -> bool {
        if self.queued.is_some() || !self.out.is_empty() {
            return false;
        }
        spare.clear();
        std::mem::swap(&mut self.out, spare);
        true
    }

    /// The next event, left in the queue: a driver whose application has no room for
    /// messages looks before it takes (the messages wait here, in order with what follows).
    pub fn peek_event(&self) -> Option<&ConnEvent> {
        self.events.front()
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
