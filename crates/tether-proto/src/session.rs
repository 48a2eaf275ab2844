//! Sessions that lose nothing: sequence numbers, cumulative ACKs, a bounded replay buffer,
//! and resumption after a reconnect (DESIGN.md §6, `docs/PROTOCOL.md` §"Sessions").
//!
//! ```text
//!   send(msg) ──▶ replay buffer [acked+1 ..= last_seq]   (bounded in bytes and messages)
//!                    │ SEQ_DATA(seq, msg) ──────────────▶ peer: seq == last_received+1 → deliver
//!                    │                                          seq <= last_received  → duplicate, drop
//!                    ◀─────────────────────── ACK(n) ◀── peer: after ack_every messages or ack_delay
//!   on_ack(n): drop entries <= n
//!
//!   reconnect: HELLO(resume: id, token, last_received=R_c) ──▶ server: WELCOME(resumed, last_received=R_s)
//!              client replays entries > R_s                     server replays entries > R_c
//! ```
//!
//! A session is owned by one connection at a time ([`Conn`](crate::Conn)) and handed back
//! when that connection ends, to be given to the next one. Each direction numbers its
//! messages from 1. The state machine never reads the clock; the resume token is supplied
//! by the caller (the driver draws it from the OS's random source).

use std::collections::VecDeque;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use bytes::Bytes;
use subtle::ConstantTimeEq;

use crate::codec::TOKEN_LEN;

/// Bounds and acknowledgement timing of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// Unacknowledged bytes kept for replay; `send` waits beyond this. Default: 4 MiB.
    pub max_replay_bytes: usize,
    /// Unacknowledged messages kept for replay; `send` waits beyond this. Default: 4096.
    pub max_replay_messages: usize,
    /// Send a cumulative ACK after this many unacknowledged received messages. Default: 32.
    pub ack_every: u32,
    /// …or after this delay, whichever comes first. Default: 20 ms.
    pub ack_delay: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_replay_bytes: 4 << 20,
            max_replay_messages: 4096,
            ack_every: 32,
            ack_delay: Duration::from_millis(20),
        }
    }
}

/// What [`Session::on_data`] decided about a received sequenced message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// In order and new: deliver it.
    Deliver,
    /// Already delivered (a replay overlap): drop it.
    Duplicate,
    /// A gap: a sequence number was skipped. Over TCP this is a protocol violation.
    Gap {
        /// The sequence number that was expected.
        expected: u64,
    },
}

/// Why an ACK was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckBeyondSent {
    /// The acknowledged sequence number.
    pub acked: u64,
    /// The highest sequence number sent.
    pub sent: u64,
}

/// What a [`Session`] carries from one server to another (a session hand-over between the
/// nodes of a cluster): its numbering, acknowledgement position and the unacknowledged
/// messages kept for the replay. Not its token (a server keeps only the token's hash) nor
/// its configuration (each server has its own).
///
/// ```text
///   acked ──┐        replay = messages acked+1 ..= last_seq (oldest first)
///           ▼
///   1 2 3 [4 5 6]      last_seq = 6, acked = 3, last_received = what the peer sent, in order
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionState {
    /// The session id.
    pub id: u64,
    /// Sequence number of the last message pushed (0 = none).
    pub last_seq: u64,
    /// Highest sequence number the peer acknowledged.
    pub acked: u64,
    /// Highest sequence number received in order.
    pub last_received: u64,
    /// How many times the session was resumed.
    pub resumes: u64,
    /// The unacknowledged messages, `acked+1 ..= last_seq`, oldest first.
    pub replay: Vec<Bytes>,
}

impl SessionState {
    /// Whether the state is consistent: `acked <= last_seq`, and the replay holds exactly
    /// the unacknowledged messages.
    pub fn check(&self) -> Result<(), SessionStateError> {
        let (acked, last_seq) = (self.acked, self.last_seq);
        if acked > last_seq {
            return Err(SessionStateError::AckedBeyondSent { acked, last_seq });
        }
        if self.replay.len() as u64 != last_seq - acked {
            return Err(SessionStateError::ReplayMismatch {
                held: self.replay.len(),
                expected: last_seq - acked,
            });
        }
        Ok(())
    }
}

/// Why a [`SessionState`] cannot become a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionStateError {
    /// The peer acknowledged more than was sent.
    #[error("acknowledged {acked} beyond the last sequence number {last_seq}")]
    AckedBeyondSent {
        /// The acknowledged number.
        acked: u64,
        /// The last sequence number.
        last_seq: u64,
    },
    /// The replay does not hold exactly the unacknowledged messages.
    #[error("replay holds {held} messages; {expected} are unacknowledged")]
    ReplayMismatch {
        /// Messages in the replay.
        held: usize,
        /// `last_seq - acked`.
        expected: u64,
    },
}

/// One side's session state.
#[derive(Debug)]
pub struct Session {
    id: u64,
    token: [u8; TOKEN_LEN],
    cfg: SessionConfig,
    /// Sequence number of the last message pushed (0 = none).
    last_seq: u64,
    /// Highest sequence number the peer acknowledged.
    acked: u64,
    /// Unacknowledged messages, oldest first: seq `acked+1 ..= last_seq`.
    replay: VecDeque<Bytes>,
    replay_bytes: usize,
    /// Sequence number of the last message transmitted on the current connection.
    sent: u64,
    /// Highest sequence number received in order.
    last_received: u64,
    /// Highest sequence number we acknowledged.
    ack_sent: u64,
    ack_deadline: Option<Instant>,
    resumes: u64,
    /// Commit-before-ACK mode ([`set_commit_mode`](Self::set_commit_mode)): the highest
    /// received number the application has made durable; ACKs never pass it. `None`: off
    /// (ACKs follow `last_received`).
    committed: Option<u64>,
}

impl Session {
    /// A new session with the given id and secret token.
    pub fn new(id: u64, token: [u8; TOKEN_LEN], cfg: SessionConfig) -> Self {
        Session {
            id,
            token,
            cfg,
            last_seq: 0,
            acked: 0,
            replay: VecDeque::new(),
            replay_bytes: 0,
            sent: 0,
            last_received: 0,
            ack_sent: 0,
            ack_deadline: None,
            resumes: 0,
            committed: None,
        }
    }

    /// The state to hand to another server ([`from_state`](Self::from_state) there). The
    /// messages are shared, not copied.
    pub fn state(&self) -> SessionState {
        SessionState {
            id: self.id,
            last_seq: self.last_seq,
            acked: self.acked,
            last_received: self.last_received,
            resumes: self.resumes,
            replay: self.replay.iter().cloned().collect(),
        }
    }

    /// A session continued from `state` (taken from another server), with this server's
    /// token and bounds. It is between connections: the next connection
    /// [`resume`](Self::resume)s it, replaying what the peer has not received. A replay
    /// beyond this server's bounds is kept whole; new messages wait until ACKs make room.
    pub fn from_state(
        token: [u8; TOKEN_LEN],
        cfg: SessionConfig,
        state: SessionState,
    ) -> Result<Session, SessionStateError> {
        state.check()?;
        let SessionState {
            id,
            last_seq,
            acked,
            last_received,
            resumes,
            replay,
        } = state;
        let replay_bytes = replay.iter().map(Bytes::len).sum();
        Ok(Session {
            id,
            token,
            cfg,
            last_seq,
            acked,
            replay: replay.into(),
            replay_bytes,
            sent: acked,
            last_received,
            // The previous server acknowledged what it acknowledged; the resume tells the
            // peer the position again (`resume` resets this).
            ack_sent: last_received,
            ack_deadline: None,
            resumes,
            committed: None,
        })
    }

    /// Commit-before-ACK mode: with `on`, the peer is acknowledged only up to what the
    /// application [`commit`](Self::commit)ted (made durable somewhere), never past it, so a
    /// peer keeps every message the application could still lose and replays it on resume.
    /// Whatever was received when the mode is turned on counts as committed (a session
    /// continued [`from_state`](Self::from_state) was committed by its previous server).
    /// Default: off (ACKs follow what was received).
    ///
    /// ```text
    ///   received 1 2 3 4 5 6        last_received = 6
    ///   committed 1 2 3             commit(3)
    ///   ACK(3)                      ACK position = min(last_received, committed)
    /// ```
    pub fn set_commit_mode(&mut self, on: bool) {
        self.committed = on.then_some(self.last_received);
    }

    /// Whether commit-before-ACK mode is on.
    pub fn commit_mode(&self) -> bool {
        self.committed.is_some()
    }

    /// The application made every received message up to `seq` durable: the ACK may go that
    /// far (never past what was received). A no-op outside commit mode and for a number at
    /// or below the committed one. The ACK falls due after the usual delay (or at once when
    /// `ack_every` messages are committed and unacknowledged).
    pub fn commit(&mut self, now: Instant, seq: u64) {
        let Some(c) = self.committed.as_mut() else {
            return;
        };
        let seq = seq.min(self.last_received);
        if seq <= *c {
            return;
        }
        *c = seq;
        if self.ack_deadline.is_none() {
            self.ack_deadline = Some(now + self.cfg.ack_delay);
        }
    }

    /// How far an ACK may go: what was received in order, or in commit mode what was
    /// committed of it.
    pub fn ack_position(&self) -> u64 {
        match self.committed {
            Some(c) => c.min(self.last_received),
            None => self.last_received,
        }
    }

    /// Replaces the resume token (the server rotates it on every resume; the newest one is
    /// the only one that works).
    pub fn set_token(&mut self, token: [u8; TOKEN_LEN]) {
        self.token = token;
    }

    /// The session id (not secret).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The resume token (secret).
    pub fn token(&self) -> &[u8; TOKEN_LEN] {
        &self.token
    }

    /// Compares `token` with this session's token in constant time.
    pub fn token_matches(&self, token: &[u8; TOKEN_LEN]) -> bool {
        bool::from(self.token.ct_eq(token))
    }

    /// The configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.cfg
    }

    /// Highest sequence number received in order (what a RESUME hello or WELCOME carries).
    pub fn last_received(&self) -> u64 {
        self.last_received
    }

    /// Sequence number of the last message pushed.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Highest sequence number the peer acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Messages held for replay.
    pub fn replay_len(&self) -> usize {
        self.replay.len()
    }

    /// Bytes held for replay.
    pub fn replay_bytes(&self) -> usize {
        self.replay_bytes
    }

    /// How many times this session was resumed.
    pub fn resumes(&self) -> u64 {
        self.resumes
    }

    /// The messages that may not have been delivered if the session ended now.
    pub fn unacked_range(&self) -> Option<RangeInclusive<u64>> {
        (self.last_seq > self.acked).then(|| self.acked + 1..=self.last_seq)
    }

    /// True when a message of `len` bytes fits the replay bounds. An empty buffer always
    /// takes one message (so a message larger than the byte bound is not stuck forever).
    pub fn has_room(&self, len: usize) -> bool {
        self.replay.is_empty()
            || (self.replay.len() < self.cfg.max_replay_messages
                && self.replay_bytes + len <= self.cfg.max_replay_bytes)
    }

    /// Takes a message for sending; returns its sequence number, or `None` when the replay
    /// buffer is full (the caller waits for an ACK).
    pub fn push(&mut self, msg: Bytes) -> Option<u64> {
        if !self.has_room(msg.len()) {
            return None;
        }
        self.last_seq += 1;
        self.replay_bytes += msg.len();
        self.replay.push_back(msg);
        Some(self.last_seq)
    }

    /// The next message to transmit on the current connection, if any, marked as sent.
    pub fn next_to_send(&mut self) -> Option<(u64, Bytes)> {
        if self.sent >= self.last_seq {
            return None;
        }
        self.sent += 1;
        let idx = (self.sent - self.acked - 1) as usize;
        self.replay.get(idx).map(|m| (self.sent, m.clone()))
    }

    /// The peer acknowledged everything up to `seq`.
    pub fn on_ack(&mut self, seq: u64) -> Result<(), AckBeyondSent> {
        if seq > self.last_seq {
            return Err(AckBeyondSent {
                acked: seq,
                sent: self.last_seq,
            });
        }
        while self.acked < seq {
            if let Some(m) = self.replay.pop_front() {
                self.replay_bytes -= m.len();
            }
            self.acked += 1;
        }
        if self.sent < self.acked {
            self.sent = self.acked;
        }
        Ok(())
    }

    /// A new connection took the session over; the peer has received everything up to
    /// `peer_last_received`. Everything after it will be replayed by
    /// [`next_to_send`](Self::next_to_send). Returns how many messages will be replayed.
    pub fn resume(&mut self, peer_last_received: u64) -> Result<u64, AckBeyondSent> {
        self.on_ack(peer_last_received)?;
        self.sent = self.acked;
        self.ack_deadline = None;
        // Our acknowledgement state went with the old connection: tell the peer again.
        self.ack_sent = 0;
        self.resumes += 1;
        Ok(self.last_seq - self.acked)
    }

    /// A sequenced message arrived.
    pub fn on_data(&mut self, now: Instant, seq: u64) -> Received {
        if seq <= self.last_received {
            return Received::Duplicate;
        }
        if seq != self.last_received + 1 {
            return Received::Gap {
                expected: self.last_received + 1,
            };
        }
        self.last_received = seq;
        if self.ack_deadline.is_none() {
            self.ack_deadline = Some(now + self.cfg.ack_delay);
        }
        Received::Deliver
    }

    /// The ACK to send now, if one is due at `now` (or `force`d, e.g. to piggyback on an
    /// outgoing write). Marks it as sent.
    pub fn poll_ack(&mut self, now: Instant, force: bool) -> Option<u64> {
        let pos = self.ack_position();
        if pos <= self.ack_sent {
            return None;
        }
        let due = force
            || pos - self.ack_sent >= u64::from(self.cfg.ack_every)
            || self.ack_deadline.is_some_and(|d| now >= d);
        if !due {
            return None;
        }
        self.ack_sent = pos;
        // Received but not committed yet: its ACK is timed from its commit.
        self.ack_deadline = None;
        Some(pos)
    }

    /// When a delayed ACK falls due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.ack_position() > self.ack_sent {
            self.ack_deadline
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s() -> Session {
        Session::new(
            1,
            [7; TOKEN_LEN],
            SessionConfig {
                max_replay_messages: 3,
                max_replay_bytes: 10,
                ..Default::default()
            },
        )
    }

    #[test]
    fn push_send_ack() {
        let mut a = s();
        assert_eq!(a.push(Bytes::from_static(b"abc")), Some(1));
        assert_eq!(a.push(Bytes::from_static(b"def")), Some(2));
        assert_eq!(a.next_to_send().unwrap().0, 1);
        assert_eq!(a.next_to_send().unwrap().0, 2);
        assert!(a.next_to_send().is_none());
        a.on_ack(1).unwrap();
        assert_eq!(a.replay_len(), 1);
        assert_eq!(a.unacked_range(), Some(2..=2));
        assert!(a.on_ack(3).is_err());
    }

    #[test]
    fn bounded_in_bytes_and_messages() {
        let mut a = s();
        assert!(a.push(Bytes::from_static(b"123456")).is_some());
        assert!(
            a.push(Bytes::from_static(b"12345")).is_none(),
            "11 bytes > 10"
        );
        assert!(a.push(Bytes::from_static(b"1234")).is_some());
        assert!(a.push(Bytes::new()).is_none() || a.replay_len() <= 3);
        let mut b = s();
        for _ in 0..3 {
            assert!(b.push(Bytes::from_static(b"x")).is_some());
        }
        assert!(b.push(Bytes::from_static(b"x")).is_none(), "3 messages max");
        // One oversized message still fits an empty buffer.
        let mut c = s();
        assert!(c.push(Bytes::from(vec![0; 100])).is_some());
    }

    #[test]
    fn state_moves_a_session_between_servers() {
        let mut a = s();
        for m in [b"a", b"b", b"c"] {
            a.push(Bytes::from_static(m));
        }
        while a.next_to_send().is_some() {}
        a.on_ack(1).unwrap();
        #[allow(clippy::disallowed_methods)] // one real Instant as the virtual clock's origin
        let t = Instant::now();
        assert_eq!(a.on_data(t, 1), Received::Deliver);
        assert_eq!(a.on_data(t, 2), Received::Deliver);
        let st = a.state();
        assert_eq!((st.last_seq, st.acked, st.last_received), (3, 1, 2));
        let mut b = Session::from_state([0; TOKEN_LEN], *a.config(), st.clone()).unwrap();
        assert_eq!(b.last_received(), 2);
        assert_eq!(b.on_data(t, 2), Received::Duplicate, "dedupe moves with it");
        assert_eq!(b.resume(2).unwrap(), 1);
        assert_eq!(b.next_to_send().unwrap(), (3, Bytes::from_static(b"c")));
        assert_eq!(
            b.push(Bytes::from_static(b"d")),
            Some(4),
            "numbering goes on"
        );
        let mut bad = st.clone();
        bad.replay.pop();
        assert_eq!(
            Session::from_state([0; TOKEN_LEN], *a.config(), bad).unwrap_err(),
            SessionStateError::ReplayMismatch {
                held: 1,
                expected: 2
            }
        );
        let mut bad = st;
        bad.acked = 9;
        assert!(Session::from_state([0; TOKEN_LEN], *a.config(), bad).is_err());
    }

    #[test]
    fn resume_replays_after_peer_position() {
        let mut a = s();
        for m in [b"a", b"b", b"c"] {
            a.push(Bytes::from_static(m));
        }
        while a.next_to_send().is_some() {}
        assert_eq!(a.resume(1).unwrap(), 2);
        assert_eq!(a.next_to_send().unwrap(), (2, Bytes::from_static(b"b")));
        assert_eq!(a.next_to_send().unwrap(), (3, Bytes::from_static(b"c")));
        assert!(a.next_to_send().is_none());
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // one real Instant as the virtual clock's origin
    fn receive_dedups_and_acks() {
        let t = Instant::now();
        let mut b = Session::new(
            1,
            [0; TOKEN_LEN],
            SessionConfig {
                ack_every: 2,
                ..Default::default()
            },
        );
        assert_eq!(b.on_data(t, 1), Received::Deliver);
        assert_eq!(b.on_data(t, 1), Received::Duplicate);
        assert_eq!(b.on_data(t, 3), Received::Gap { expected: 2 });
        assert_eq!(
            b.poll_ack(t, false),
            None,
            "1 < ack_every and delay not passed"
        );
        assert_eq!(b.poll_timeout(), Some(t + Duration::from_millis(20)));
        assert_eq!(b.poll_ack(t + Duration::from_millis(20), false), Some(1));
        assert_eq!(b.on_data(t, 2), Received::Deliver);
        assert_eq!(b.on_data(t, 3), Received::Deliver);
        assert_eq!(b.poll_ack(t, false), Some(3), "two unacked = ack_every");
        assert!(b.token_matches(&[0; TOKEN_LEN]));
        assert!(!b.token_matches(&[1; TOKEN_LEN]));
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // one real Instant as the virtual clock's origin
    fn commit_mode_never_acks_past_what_was_committed() {
        let t = Instant::now();
        let d = Duration::from_millis(20);
        let mut b = Session::new(
            1,
            [0; TOKEN_LEN],
            SessionConfig {
                ack_every: 2,
                ..Default::default()
            },
        );
        b.set_commit_mode(true);
        assert!(b.commit_mode());
        for q in 1..=5 {
            assert_eq!(b.on_data(t, q), Received::Deliver);
        }
        assert_eq!(b.ack_position(), 0);
        assert_eq!(
            b.poll_ack(t + d, true),
            None,
            "nothing committed, even forced"
        );
        assert_eq!(b.poll_timeout(), None, "no timer for uncommitted messages");
        b.commit(t, 1);
        assert_eq!(
            b.poll_ack(t, false),
            None,
            "one < ack_every, delay not passed"
        );
        assert_eq!(b.poll_timeout(), Some(t + d));
        assert_eq!(b.poll_ack(t + d, false), Some(1));
        b.commit(t + d, 9);
        assert_eq!(
            b.ack_position(),
            5,
            "a commit beyond what was received is capped"
        );
        assert_eq!(
            b.poll_ack(t + d, false),
            Some(5),
            "four committed >= ack_every"
        );
        b.commit(t + d, 3);
        assert_eq!(b.ack_position(), 5, "commits never go back");
        assert_eq!(b.on_data(t, 6), Received::Deliver);
        assert_eq!(b.poll_ack(t + d * 10, true), None, "6 is not committed");
        // Whatever the interleaving, no ACK passes the committed number.
        let mut seed = 7u64;
        let mut c = Session::new(2, [0; TOKEN_LEN], SessionConfig::default());
        c.set_commit_mode(true);
        let (mut received, mut committed, mut now) = (0u64, 0u64, t);
        for _ in 0..5000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            now += Duration::from_millis(seed >> 60);
            match (seed >> 33) % 3 {
                0 => {
                    received += 1;
                    assert_eq!(c.on_data(now, received), Received::Deliver);
                }
                1 => {
                    committed = committed.max((seed >> 40) % (received + 1));
                    c.commit(now, committed);
                }
                _ => {
                    if let Some(a) = c.poll_ack(now, (seed >> 50) % 2 == 0) {
                        assert!(a <= committed && a <= received, "ACK {a} > {committed}");
                    }
                }
            }
        }
        // Off: commits change nothing and ACKs follow what was received.
        let mut off = Session::new(3, [0; TOKEN_LEN], SessionConfig::default());
        assert_eq!(off.on_data(t, 1), Received::Deliver);
        off.commit(t, 0);
        assert_eq!(off.poll_ack(t, true), Some(1));
        // Turned on for a continued session: what it received counts as committed.
        let mut st =
            Session::from_state([0; TOKEN_LEN], SessionConfig::default(), off.state()).unwrap();
        st.set_commit_mode(true);
        assert_eq!(st.ack_position(), 1);
    }
}
